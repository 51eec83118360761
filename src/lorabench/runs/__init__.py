"""Running configs: cells and result rows, the workflow's jobs and steps, dispatch, the Parquet schema, selection by validation loss, projected and recorded costs."""
