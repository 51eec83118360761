"""Run configurations: group them into cells, build models, construct or train, evaluate.

Each configuration yields result rows (plain dicts) carrying the full config, its hash,
the protocol, versions, device and timings, so a row alone says where a number came from.
Gradient runs yield two rows, ``checkpoint = last`` (the final state, the authors'
choice) and ``checkpoint = best`` (the state with the lowest validation loss); the
construction yields one row, ``checkpoint = construction``.
"""

from __future__ import annotations

import math
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator, Mapping, Optional

import torch
from torch import Tensor

from ..core import data, theory
from ..core.config import RunConfig
from ..core.generation import Models
from ..core.models import FNN, map_tensors
from ..core.protocols import generate_models, protocol_of
from ..methods import method_of, validated
from ..training import native
from ..training.loop import TrainResult, evaluate, outputs_in_chunks, train_cell
from ..training.trainables import stack_models, target_outputs_for
from .provenance import code_version, cpu_model

# Configurations of one cell may differ only in these settings.
CELL_VARYING = ("rank", "rank_step", "lr", "weight_decay", "tune_bias", "last_layers", "best_epoch")
# Configs trained together: the limit bounds a torch cell's memory, which grows with its
# configs. The native transformer step keeps one config's activations at a time, so its
# cells hold a whole grid of the paper (16 ranks x 3 learning rates x 4 weight decays):
# what a cell pays per step (the shared batch, its target's outputs, the loop) is then
# paid once for 192 configs rather than three times for 64.
MAX_CELL = {"fnn": 512, "tfn": 64}
MAX_NATIVE_CELL = {"fnn": 512, "tfn": 192}


class DeviceError(RuntimeError):
    """A device that was asked for and is not there."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device 'cuda' requested but torch sees no CUDA device")
    return torch.device(device)


def cell_key(cfg: RunConfig) -> RunConfig:
    return cfg.replace(**{name: RunConfig.__dataclass_fields__[name].default for name in CELL_VARYING})


def cells(cfgs: Iterable[RunConfig], native_engine: Callable[[RunConfig], bool] = lambda cfg: False
          ) -> list[list[RunConfig]]:
    """Group configs into cells (same seed and model family, same method), in first-seen
    order, split to at most MAX_CELL configs, or MAX_NATIVE_CELL where the native step
    trains them (``trains_natively``; ``native_engine``: the engine decision,
    ``native_engine_for``)."""
    groups: "OrderedDict[RunConfig, list[RunConfig]]" = OrderedDict()
    for cfg in cfgs:
        groups.setdefault(cell_key(cfg), []).append(cfg)
    out = []
    for members in groups.values():
        cfg = members[0]
        size = (MAX_NATIVE_CELL if trains_natively(cfg, native_engine) else MAX_CELL)[cfg.exp]
        out.extend(members[i : i + size] for i in range(0, len(members), size))
    return out


def trains_natively(cfg: RunConfig, native_engine: Callable[[RunConfig], bool]) -> bool:
    """Whether the native step trains ``cfg``'s cell: its method has one and the engine
    decision ``native_engine(cfg)`` says so."""
    return method_of(cfg).native and native_engine(cfg)


def native_engine_for(device: torch.device) -> Callable[[RunConfig], bool]:
    """The engine decision on ``device`` without building anything: whether the native
    step would train a cell (``LORABENCH_ENGINE`` not 'torch', ``native.applies``)."""
    return lambda cfg: native.engine_setting() != "torch" and native.applies(cfg, device)


def model_key(cfg: RunConfig) -> RunConfig:
    """The config that names ``cfg``'s models: its settings that model generation reads
    (paper protocol: the rank only changes the adapters' initialisation; reference
    protocol: the rank changes the authors' random-number order, so it is part of the key).
    ``generate_models(model_key(cfg))`` gives ``cfg``'s models."""
    return protocol_of(cfg).model_key(cfg)


class ModelCache:
    """Models are generated once per model key (see ``model_key``). ``models`` preloads
    the cache with pre-generated models (``{model_key(cfg): Models}``), e.g. from files."""

    def __init__(self, models: Optional[Mapping[RunConfig, Models]] = None):
        self._cache: dict[RunConfig, Models] = dict(models or {})

    def get(self, cfg: RunConfig) -> Models:
        key = model_key(cfg)
        if key not in self._cache:
            self._cache[key] = generate_models(key)
        return protocol_of(cfg).with_adapters(cfg, self._cache[key])


def provenance(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return {
        "lorabench_version": code_version(),
        "torch_version": torch.__version__,
        "device": device.type,
        "device_name": name,
        "torch_threads": torch.get_num_threads(),
    }


def threshold_rank(cfg: RunConfig) -> int:
    if cfg.exp == "tfn":
        return theory.tfn_threshold_rank(cfg.width)
    return theory.fnn_threshold_rank(cfg.width, cfg.frozen_depth, cfg.target_depth)


def theory_columns(cfg: RunConfig, models: Models, target_scale: float) -> dict:
    """The theory a row's figures and claims compare with, from the row's own models, so
    that reporting needs no model code: the single-layer SVD optimum at the row's rank
    (None unless the target is a one-layer FNN), the same form on the plain transformer's
    attention products (``theory.tfn_product_tail``; None for FNNs) and the target's mean squared output on
    the test inputs (``theory.mean_squared_output``, shared by a cell's rows)."""
    return {
        "svd_optimum_mse": theory.single_layer_optimum(models.frozen, models.target, cfg.rank),
        "attention_tail": theory.tfn_product_tail(models.frozen, models.target, cfg.rank),
        "target_mse_scale": target_scale,
    }


def _base_row(cfg: RunConfig, models: Models, device: torch.device, target_scale: float) -> dict:
    row = cfg.to_dict()
    row.update(
        config_hash=cfg.config_hash(),
        n_trainable_params=method_of(cfg).parameter_count(cfg),
        method_digest=method_of(cfg).digest,
        threshold_rank=threshold_rank(cfg),
        pretrain_steps=models.pretrain_steps,
    )
    row.update(theory_columns(cfg, models, target_scale))
    row.update(provenance(device))
    return row


EVAL_SETS = ("test", "test_shift", "val")


def _eval_inputs(sets: data.EvalSets, device) -> dict[str, Tensor]:
    return {name: getattr(sets, name).to(device) for name in EVAL_SETS}


def _metrics(model, target, inputs: Mapping[str, Tensor], cfg: RunConfig,
             target_outputs: Optional[Mapping[str, Tensor]] = None) -> list[dict]:
    """Test, shifted test and validation metrics of stacked models, one dict per config
    (``inputs``: _eval_inputs; ``target_outputs``: the target's outputs on them)."""
    out = {}
    for name, x in inputs.items():
        truth = None if target_outputs is None else target_outputs[name]
        result = evaluate(model, target, x, cfg.task, protocol_of(cfg).classification_loss, target_outputs=truth)
        out[f"{name}_loss"] = result["loss"]
        if "accuracy" in result:
            out[f"{name}_accuracy"] = result["accuracy"]
    n = next(iter(out.values())).shape[0]
    return [{k: float(v[c]) for k, v in out.items()} for c in range(n)]


def _run_construction(cfg: RunConfig, models: Models, device: torch.device) -> dict:
    start = time.perf_counter()
    protocol = protocol_of(cfg)
    dtype = protocol.construction_dtype
    try:
        adapted = method_of(cfg).construct(cfg, models, dtype, protocol.calibration_inputs(cfg),
                                           protocol.authors_bias_propagation)
    except torch.linalg.LinAlgError:
        # Non-finite or singular weights: no construction exists; record it as diverged
        # (NaN metrics) instead of failing the whole job.
        adapted = None
    sets = protocol.eval_sets(cfg)
    row = _base_row(cfg, models, device, theory.mean_squared_output(models.target, sets.test))
    if adapted is None:
        row.update({f"{name}_loss": math.nan for name in ("test", "test_shift", "val")})
        if cfg.task != "regression":
            row.update({f"{name}_accuracy": math.nan for name in ("test", "test_shift", "val")})
    else:
        adapted, target = adapted.to(device), _cast(models.target, dtype).to(device)
        sets = data.EvalSets(*(s.to(dtype) for s in (sets.val, sets.test, sets.test_shift)))
        row.update(_metrics(adapted, target, _eval_inputs(sets, device), cfg)[0])
    row.update(
        checkpoint="construction",
        engine="torch",
        train_loss=None,
        best_step=None,
        # A construction "diverges" when its numbers are not finite (e.g. a singular
        # frozen matrix): it is then excluded from selection like a diverged run.
        diverged=not (math.isfinite(row["test_loss"]) and math.isfinite(row["val_loss"])),
        diverged_step=None,
        wall_time_s=time.perf_counter() - start,
        cell_size=1,
        curve_steps=[],
        train_curve=[],
        val_curve=[],
    )
    return row


def _cast(model, dtype):
    return map_tensors(model, lambda t: t.to(dtype))


@dataclass
class TrainedCell:
    """A gradient cell after training: the trainer's result, the trainable that gives the
    trained models (``trainable.model(result.last)``), and what it trained against."""

    result: TrainResult
    trainable: object
    stream: object
    sets: data.EvalSets
    target: object
    models: list[Models]


def train_gradient_cell(cell: list[RunConfig], cache: ModelCache, device: torch.device,
                        progress: Optional[Callable[[int], None]] = None) -> TrainedCell:
    """Train one cell of gradient configs as the workflow does."""
    cfg = cell[0]
    all_models = [cache.get(c) for c in cell]
    target = all_models[0].target.to(device)
    frozen = stack_models([m.frozen for m in all_models]).to(device)
    trainable = method_of(cfg).trainable(cell, frozen, all_models)
    protocol = protocol_of(cfg)
    sets = protocol.eval_sets(cfg)
    stream = protocol.stream(cfg, target, sets, protocol.training_set(all_models), len(cell), device,
                             target_outputs_for(trainable, target))
    result = train_cell(cell, trainable, stream, progress)
    return TrainedCell(result, trainable, stream, sets, target, all_models)


def _run_gradient_cell(cell: list[RunConfig], cache: ModelCache, device: torch.device, progress) -> list[dict]:
    start = time.perf_counter()
    cfg = cell[0]
    trained = train_gradient_cell(cell, cache, device, progress)
    result, trainable, stream, sets, target, all_models = (
        trained.result, trained.trainable, trained.stream, trained.sets, trained.target, trained.models)
    train_seconds = time.perf_counter() - start
    if hasattr(stream, "drawn"):  # the reference transformer's own batches: what `lorabench plan` projects
        print(f"reference stream: {stream.drawn} positions drawn for {len(cell)} configs x {cfg.n_epochs} steps "
              f"({stream.drawn / (len(cell) * cfg.n_epochs):.3f} per config-step)", file=sys.stderr)

    rows = []
    target_scale = theory.mean_squared_output(all_models[0].target, sets.test)
    inputs = _eval_inputs(sets, device)
    truths = {name: outputs_in_chunks(target, x) for name, x in inputs.items()}
    for checkpoint, params, val in (("last", result.last, result.last_val), ("best", result.best, result.best_val)):
        metrics = []
        # The transformer's stacked einsums round differently for different numbers of
        # configurations: one at a time, a config's metrics do not depend on its cell.
        chunk = 1 if cfg.exp == "tfn" else 128
        model = trainable.model(params)
        for begin in range(0, len(cell), chunk):
            part = _slice_model(model, begin, begin + chunk)
            metrics.extend(_metrics(part, target, inputs, cfg, truths))
        for c, member in enumerate(cell):
            row = _base_row(member, all_models[c], device, target_scale)
            row.update(metrics[c])
            diverged = bool(result.diverged_step[c] >= 0)
            row.update(
                checkpoint=checkpoint,
                engine=trainable.engine_label,
                # The fixed-set validation loss seen during training (reference TFN: the
                # authors' per-step batch), rather than the re-evaluation above.
                val_loss=float(val[c]),
                train_loss=float(result.last_train[c]),
                best_step=int(result.best_step[c]),
                diverged=diverged,
                diverged_step=int(result.diverged_step[c]) if diverged else None,
                wall_time_s=train_seconds / len(cell),
                cell_size=len(cell),
                curve_steps=list(result.curve_steps),
                train_curve=result.train_curve[c].tolist(),
                val_curve=result.val_curve[c].tolist(),
            )
            rows.append(row)
    return rows


def _slice_model(model, begin: int, end: int):
    return map_tensors(model, lambda t: t[begin:end])


def run_configs(
    cfgs: Iterable[RunConfig],
    device: str = "auto",
    progress: Optional[Callable[[str, int, int], None]] = None,
    models: Optional[Mapping[RunConfig, Models]] = None,
) -> Iterator[dict]:
    """Run validated configs; yields result rows, cell by cell.

    ``progress(label, done, total)`` is called as steps complete. ``models`` maps
    ``model_key(cfg)`` to pre-generated models; configs whose key is absent get theirs
    generated.
    """
    cfgs = [validated(c) for c in cfgs]
    dev = resolve_device(device)
    cache = ModelCache(models)
    constructions = [c for c in cfgs if method_of(c).closed_form]
    for i, cfg in enumerate(constructions):
        yield _run_construction(cfg, cache.get(cfg), dev)
        if progress:
            progress("construction", i + 1, len(constructions))
    gradient_cells = cells((c for c in cfgs if not method_of(c).closed_form), native_engine_for(dev))
    total = sum(cell[0].n_epochs for cell in gradient_cells)
    done = 0
    for cell in gradient_cells:
        tick = (lambda step, offset=done: progress("training", offset + step, total)) if progress else None
        yield from _run_gradient_cell(cell, cache, dev, tick)
        done += cell[0].n_epochs
