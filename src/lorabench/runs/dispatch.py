"""Where a training function runs: in this process, in a submitit local job, or in a Slurm
job submitted through submitit. The caller gets the function's return value, or a
``DispatchError`` that says which job failed and where its log is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

DISPATCHES = ("local", "submitit-local", "slurm")


@dataclass(frozen=True)
class SlurmSettings:
    """Where ``dispatch: slurm`` sends training jobs (submitit's Slurm executor)."""

    partition: str = ""
    gpus: int = 1
    cpus: int = 2
    mem_gb: int = 8
    time_min: int = 120
    account: str = ""
    qos: str = ""


class DispatchError(Exception):
    """A dispatched job failed or did not finish; the message names the job and its log."""


def run(
    fn: Callable[..., Any],
    *args: Any,
    mode: str = "local",
    log_dir: Optional[str] = None,
    name: str = "lorabench",
    slurm: Optional[SlurmSettings] = None,
) -> Any:
    """Run ``fn(*args)`` as ``mode`` says (local | submitit-local | slurm) and return its result.

    The submitit modes pickle ``fn`` and ``args`` (so ``fn`` must be a module-level
    function) and wait for the job; submitit's logs go to ``log_dir``.
    """
    if mode not in DISPATCHES:
        raise DispatchError(f"dispatch must be one of {DISPATCHES}, got {mode!r}")
    if mode == "local":
        return fn(*args)

    import submitit

    folder = Path(log_dir or "logs/submitit")
    folder.mkdir(parents=True, exist_ok=True)
    if mode == "submitit-local":
        executor = submitit.AutoExecutor(folder=folder, cluster="local")
        executor.update_parameters(name=name, timeout_min=24 * 60)
    else:
        slurm = slurm or SlurmSettings()
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        params: dict[str, Any] = dict(
            name=name, timeout_min=slurm.time_min, cpus_per_task=slurm.cpus, mem_gb=slurm.mem_gb, tasks_per_node=1, nodes=1
        )
        if slurm.gpus:
            params["gpus_per_node"] = slurm.gpus
        if slurm.partition:
            params["slurm_partition"] = slurm.partition
        if slurm.account:
            params["slurm_account"] = slurm.account
        if slurm.qos:
            params["slurm_qos"] = slurm.qos
        executor.update_parameters(**params)
    try:
        job = executor.submit(fn, *args)
    except Exception as error:  # sbatch refused the job (bad partition, no such account, ...)
        raise DispatchError(f"{mode}: could not submit job {name!r}: {error}") from None
    print(f"lorabench: {mode} job {job.job_id} submitted ({name}); logs in {folder}", flush=True)
    try:
        return job.result()
    except Exception as error:
        log = _log_lines(job.paths.stderr)
        # the job's own exception is the last line of its log; else submitit's reason
        cause = log[-1].strip() if log else f"{type(error).__name__}: {_first_line(error)}"
        tail = "\n".join("  | " + line for line in log[-20:]) or "  (no log)"
        raise DispatchError(f"{mode} job {job.job_id} ({name}) failed: {cause}\n  log: {job.paths.stderr}\n{tail}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else ""


def _log_lines(path: Path) -> list[str]:
    try:
        return [line for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return []
