"""The native training steps (training_steps.c): built on first use, loaded with ctypes.

The C source is compiled once per machine, width and token limit into a cache folder
(``LORABENCH_CACHE_DIR``, else ``$XDG_CACHE_HOME/lorabench``, else ``~/.cache/lorabench``):
one library per width (``-DWIDTH=D``) and token limit (``-DMAX_TOKENS``: TOKEN_LIMITS),
built the first time a cell of that width trains, so a run pays for the widths and token
counts it uses only (the wide copies, and the attention passes' copies for longer score
rows, take most of the compile time). The library's name holds a hash of the source, the
compiler's version and the CPU model and flags, then the width and token limit: it is
built for the CPU it runs on (``-march=native``), so nodes with different CPUs sharing a
home folder each get their own. A build says so on stderr while it runs. The library is
written under a temporary name and renamed.

``LORABENCH_ENGINE`` picks the trainer of FNN and TFN cells on the CPU:

* ``auto`` (default): native where it applies and builds, in both protocols, else torch
  (with a warning when the build fails);
* ``native``: native where it applies; a failed build is an error;
* ``torch``: the stacked-tensor torch trainer everywhere.

Each result row records the engine that produced it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from ..core.adapters import TFN_ADAPTED

ENGINES = ("auto", "native", "torch")
WIDTHS = (16, 32, 48, 64)  # the widths training_steps.c is specialised for
MAX_TOKENS = 64
# The token limits a library is built for: a run of at most 16 tokens (the paper's
# transformer has 10; an FNN has none) builds the small one, in about half the time.
TOKEN_LIMITS = (16, MAX_TOKENS)
TASK_CODES = {"regression": 0, "classification": 1, "binary_classification": 2}
# Or'ed into a classification task's code: the loss against the target's argmax class.
LABELS_CODE = 4
FLAGS = ["-O3", "-march=native", "-std=gnu11", "-shared", "-fPIC", "-fno-math-errno"]
# Samples the transformer's token-row passes take at a time (a multiple of 4). The
# activations a training pass keeps for its backward pass are about 20 KB a sample at the
# paper's transformer (width 16, 10 tokens, two blocks): a batch of 256 (5 MB) spills from
# a core's L2 cache between the forward and the backward pass, where 16 samples (320 KB)
# stay in it. The results do not depend on it (training_steps.c, tfn_token_pass).
TFN_CHUNK_SAMPLES = 16
SUBNORMALS = ("flush", "keep")  # the steps' subnormal floats (training_steps.c says why they are flushed)


class NativeError(RuntimeError):
    """The native step was asked for and cannot be had; the message says why."""


def subnormals_setting() -> str:
    value = os.environ.get("LORABENCH_NATIVE_SUBNORMALS", "flush")
    if value not in SUBNORMALS:
        raise NativeError(f"LORABENCH_NATIVE_SUBNORMALS must be one of {SUBNORMALS}, got {value!r}")
    return value


def _flags() -> list[str]:
    return FLAGS + (["-DKEEP_SUBNORMALS"] if subnormals_setting() == "keep" else [])


def engine_name() -> str:
    """The native engine's name in result rows: it says when subnormals were kept."""
    return "native" if subnormals_setting() == "flush" else "native-keep-subnormals"


def engine_setting() -> str:
    value = os.environ.get("LORABENCH_ENGINE", "auto")
    if value not in ENGINES:
        raise NativeError(f"LORABENCH_ENGINE must be one of {ENGINES}, got {value!r}")
    return value


class _Shape(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int) for name in
                ("depth", "width", "batch", "val_batch", "full", "has_bias", "relu", "task")] + [
        (name, ctypes.c_long) for name in ("n_param", "off_a", "off_b", "off_bias", "x_stride", "y_stride")]


class _TfnShape(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int) for name in
                ("depth", "heads", "width", "tokens", "batch", "val_batch", "prenorm", "chunk")] + [
        ("n_param", ctypes.c_long), ("off_a", ctypes.c_long * len(TFN_ADAPTED)),
        ("off_b", ctypes.c_long * len(TFN_ADAPTED)),
        ("off_b1", ctypes.c_long), ("off_b2", ctypes.c_long)] + [
        (name, ctypes.c_long) for name in ("x_stride", "y_stride", "vx_stride", "vy_stride")]


class _AdamConsts(ctypes.Structure):
    _fields_ = [(name, ctypes.c_float) for name in ("beta1", "beta2", "eps", "bias_correction2_sqrt")]


def cache_dir() -> Path:
    if os.environ.get("LORABENCH_CACHE_DIR"):
        return Path(os.environ["LORABENCH_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lorabench"


def _cpu_fingerprint() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in lines if line.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(sorted(set(keep)))


def _compiler() -> str:
    return os.environ.get("CC", "cc")


def _compile(compiler: str, source: bytes, library: Path, width: int, max_tokens: int) -> None:
    """Compile ``source`` for ``width`` and transformers of up to ``max_tokens`` tokens into
    ``library``, which appears whole or not at all."""
    folder = library.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise NativeError(f"cannot create the build cache {folder}: {error}") from None
    print(f"lorabench: building the native training step for width {width}, up to {max_tokens} tokens, with "
          f"{compiler} (once per machine; cached in {folder}) ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        src, out = Path(tmp) / "training_steps.c", Path(tmp) / "training_steps.so"
        src.write_bytes(source)
        proc = subprocess.run([compiler, *_flags(), f"-DWIDTH={width}", f"-DMAX_TOKENS={max_tokens}", "-o", str(out),
                               str(src), "-lm"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise NativeError(f"building the native training steps failed:\n{proc.stderr.strip()}")
        os.replace(out, library)
    print(f"lorabench: built in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


def _build(width: int = WIDTHS[0], tokens: int = 0) -> ctypes.CDLL:
    """The library of the steps for ``width`` (one of WIDTHS) and transformers of
    ``tokens`` tokens (0: FNNs only), built on first use."""
    if width not in WIDTHS:
        raise NativeError(f"the native step is specialised for widths {WIDTHS}, not {width}")
    if tokens > MAX_TOKENS:
        raise NativeError(f"the native step takes at most {MAX_TOKENS} tokens, not {tokens}")
    return _library(width, next(limit for limit in TOKEN_LIMITS if tokens <= limit))


@lru_cache(maxsize=None)
def _library(width: int, max_tokens: int) -> ctypes.CDLL:
    source = resources.files("lorabench.training").joinpath("training_steps.c").read_bytes()
    compiler = _compiler()
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        raise NativeError(f"no C compiler ({compiler!r}: {error}); set CC or LORABENCH_ENGINE=torch") from None
    key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(_flags()).encode(),
                                     _cpu_fingerprint().encode()])).hexdigest()[:16]
    folder = cache_dir()
    library = folder / f"training_steps-{key}-w{width}-n{max_tokens}.so"
    if not library.exists():
        _compile(compiler, source, library, width, max_tokens)
    lib = ctypes.CDLL(str(library))
    lib.fnn_step.restype = lib.tfn_step.restype = lib.tfn_forward.restype = lib.tfn_gradients.restype = ctypes.c_int
    _check_abi(lib)
    return lib


TFN_FROZEN = ("wq", "wk", "wv", "wo", "w1", "w2", "w_out")  # the order of the C TfnFrozen struct


def _check_abi(lib: ctypes.CDLL) -> None:
    """The C side's struct sizes and TFN orders must be those this module passes."""
    lib.abi_layout.restype = ctypes.c_int
    expected = {
        "sizeof(Shape)": ctypes.sizeof(_Shape),
        "sizeof(TfnShape)": ctypes.sizeof(_TfnShape),
        "sizeof(AdamConsts)": ctypes.sizeof(_AdamConsts),
        "T_ADAPTED (the adapted TFN matrices)": len(TFN_ADAPTED),
        "TfnFrozen pointers (the frozen TFN tensors)": len(TFN_FROZEN),
        **{f"enum index of {name}": i for i, name in enumerate(TFN_ADAPTED)},
    }
    values = (ctypes.c_long * len(expected))()
    count = lib.abi_layout(values, len(expected))
    if count != len(expected):
        raise NativeError(f"training_steps.c reports {count} layout values, native.py expects {len(expected)}")
    for (what, want), got in zip(expected.items(), values):
        if got != want:
            raise NativeError(f"training_steps.c and native.py disagree on {what}: C {got}, Python {want}")


def available(width: int = WIDTHS[0]) -> bool:
    """Whether the native library builds and loads here (errors are not raised)."""
    try:
        _build(width)
        return True
    except NativeError:
        return False


def applies(cfg, device: torch.device) -> bool:
    """Whether the native step can train ``cfg``'s cells: on the CPU, at the widths it is
    specialised for; FNN cells of every method and task; TFN regression cells, plain or
    pre-norm (the authors' post-norm residual variant trains with torch)."""
    if device.type != "cpu" or cfg.width not in WIDTHS:
        return False
    if cfg.exp == "fnn":
        return cfg.task in TASK_CODES
    return cfg.task == "regression" and not cfg.better_optim and cfg.seq_length <= MAX_TOKENS


def use_native(cfg, device: torch.device) -> bool:
    """The engine decision for one cell, by ``LORABENCH_ENGINE``."""
    setting = engine_setting()
    if setting == "torch" or not applies(cfg, device):
        return False
    try:
        _build(cfg.width, cfg.seq_length if cfg.exp == "tfn" else 0)
        return True
    except NativeError as error:
        if setting == "native":
            raise
        warnings.warn(f"native training step unavailable, training with torch: {error}", stacklevel=2)
        return False


def _ptr(t: Tensor):
    return ctypes.c_void_p(t.data_ptr())


class NativeStep:
    """The native step of one cell. ``__call__`` updates param, exp_avg, exp_avg_sq in
    place (active configs with a finite training loss) and returns the training loss
    (before the update) and the validation loss (after it), both (C,) float32."""

    # Whether the step also takes one validation batch per configuration ((C, ...) inputs)
    # and row indices into a few distinct batches.
    per_config_validation = False

    def __init__(self, width: int, tokens: int = 0):
        self.lib = _build(width, tokens)

    def rows(self, t: Tensor) -> Tensor:
        """Inputs and targets as the kernel reads them."""
        return t.contiguous()

    def _shape(self, x: Tensor, y: Tensor, vx: Tensor, vy: Tensor):
        raise NotImplementedError

    def _run(self, shape, consts, begin: int, end: int, tensors: list, rows: tuple) -> int:
        raise NotImplementedError

    def __call__(self, param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, mask: Tensor, step_size: Tensor,
                 weight_decay: Tensor, betas: tuple[float, float], eps: float, bias_correction2_sqrt: float,
                 x: Tensor, y: Tensor, vx: Tensor, vy: Tensor, active: Tensor, threads: int,
                 x_row: Optional[Tensor] = None, v_row: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """``x_row``/``v_row`` (C,): configuration c trains on ``x[x_row[c]]`` (validates on
        ``vx[v_row[c]]``) of a few distinct batches; None: on its own row, or on the one
        shared batch."""
        C = param.shape[0]
        x, y, vx, vy = (self.rows(t) for t in (x, y, vx, vy))
        tensors = [param, exp_avg, exp_avg_sq, mask, step_size, weight_decay, x, y, vx, vy]
        for t in tensors:
            if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu":
                raise NativeError("native step: every tensor must be contiguous float32 on the CPU")
        shared, stacked = (vx.dim() == len(self.sample_shape) + n for n in (1, 2))
        if vy.dim() != vx.dim() or not (shared or (stacked and self.per_config_validation)):
            raise NativeError("native step: the validation set must be shared by the cell")
        rows = tuple(self._row_index(row, t, C) for row, t in ((x_row, x), (v_row, vx)))
        shape = self._shape(x, y, vx, vy)
        consts = _AdamConsts(beta1=betas[0], beta2=betas[1], eps=eps, bias_correction2_sqrt=bias_correction2_sqrt)
        train_loss = torch.empty(C, dtype=torch.float32)
        val_loss = torch.empty(C, dtype=torch.float32)
        tensors += [active.to(torch.uint8).contiguous(), train_loss, val_loss]

        def run(begin: int, end: int) -> int:
            # ctypes releases the GIL for the call: threads run configurations in parallel.
            return self._run(shape, consts, begin, end, tensors, rows)

        if any(code != 0 for code in _over_threads(run, C, threads)):
            raise NativeError("native step: out of memory or shape out of range")
        return train_loss, val_loss

    def _row_index(self, row: Optional[Tensor], batches: Tensor, C: int) -> Optional[Tensor]:
        if row is None:
            return None
        if not self.per_config_validation:
            raise NativeError("native step: this step takes no row index")
        if batches.dim() != len(self.sample_shape) + 2 or row.shape != (C,) or not (
                0 <= int(row.min()) and int(row.max()) < batches.shape[0]):
            raise NativeError("native step: a row index needs (K, ...) batches and C indices below K")
        return row.to(torch.int32).contiguous()


class FNNStep(NativeStep):
    """Frozen weights (C, L, D, D) (None for final-layer tuning), the flat-parameter
    offsets of the cell's layout, and the run settings."""

    sample_shape = ("D",)

    def __init__(self, *, frozen_weights: Optional[Tensor], offsets: dict[str, tuple[int, int]], n_param: int,
                 depth: int, width: int, has_bias: bool, relu: bool, task: str, classification_loss: str,
                 full: bool):
        super().__init__(width)
        self.frozen = None if frozen_weights is None else frozen_weights.detach().to(torch.float32).contiguous()
        self.offsets, self.n_param = offsets, n_param
        self.depth, self.width, self.has_bias, self.relu = depth, width, has_bias, relu
        labels = task != "regression" and classification_loss == "labels"
        self.task, self.full = TASK_CODES[task] | (LABELS_CODE if labels else 0), full

    def _shape(self, x: Tensor, y: Tensor, vx: Tensor, vy: Tensor) -> _Shape:
        first = "weights" if self.full else "a"
        return _Shape(
            depth=self.depth, width=self.width, batch=x.shape[-2], val_batch=vx.shape[-2], full=int(self.full),
            has_bias=int(self.has_bias), relu=int(self.relu), task=self.task, n_param=self.n_param,
            off_a=self.offsets[first][0], off_b=self.offsets["b"][0] if "b" in self.offsets else 0,
            off_bias=self.offsets["biases"][0] if self.has_bias else 0,
            x_stride=0 if x.dim() == 2 else x.shape[-2] * x.shape[-1],
            y_stride=0 if y.dim() == 2 else y.shape[-2] * y.shape[-1],
        )

    def _run(self, shape, consts, begin, end, tensors, rows) -> int:
        frozen = self.frozen if self.frozen is not None else tensors[0]  # unused for final-layer tuning
        return self.lib.fnn_step(ctypes.byref(shape), ctypes.byref(consts), begin, end, _ptr(frozen),
                                 *map(_ptr, tensors))


class TFNStep(NativeStep):
    """Frozen stacked TFN tensors (C, ...), the flat-parameter offsets of the cell's layout
    (a_/b_ factors of TFN_ADAPTED, biases b1 b2) and the model's sizes. Inputs
    (B, D, N) are handed to the kernel as token rows (B, N, D)."""

    sample_shape = ("D", "N")
    per_config_validation = True  # the reference protocol's streams

    def __init__(self, *, frozen: dict[str, Tensor], offsets: dict[str, tuple[int, int]], n_param: int,
                 depth: int, heads: int, width: int, tokens: int, prenorm: bool = False):
        super().__init__(width, tokens)
        self.frozen = [frozen[name].detach().to(torch.float32).contiguous() for name in TFN_FROZEN]
        C = self.frozen[0].shape[0]
        n = len(TFN_FROZEN)
        self.frozen_ptrs = (ctypes.c_void_p * n)(*[t.data_ptr() for t in self.frozen])
        self.frozen_strides = (ctypes.c_long * n)(*[t.numel() // C for t in self.frozen])
        self.offsets, self.n_param = offsets, n_param
        self.depth, self.heads, self.width, self.prenorm = depth, heads, width, int(prenorm)

    def rows(self, t: Tensor) -> Tensor:
        return t.transpose(-1, -2).contiguous()

    def _shape(self, x: Tensor, y: Tensor, vx: Tensor, vy: Tensor) -> _TfnShape:
        n, names = len(TFN_ADAPTED), TFN_ADAPTED
        return _TfnShape(
            depth=self.depth, heads=self.heads, width=self.width, tokens=x.shape[-2], batch=x.shape[-3],
            val_batch=vx.shape[-3], prenorm=self.prenorm, chunk=TFN_CHUNK_SAMPLES, n_param=self.n_param,
            off_a=(ctypes.c_long * n)(*[self.offsets[f"a_{name}"][0] for name in names]),
            off_b=(ctypes.c_long * n)(*[self.offsets[f"b_{name}"][0] for name in names]),
            off_b1=self.offsets["b1"][0], off_b2=self.offsets["b2"][0],
            **{f"{name}_stride": 0 if t.dim() == 3 else t[0].numel() for name, t in
               (("x", x), ("y", y), ("vx", vx), ("vy", vy))},
        )

    def _run(self, shape, consts, begin, end, tensors, rows) -> int:
        data, outputs = tensors[:10], tensors[10:]  # the row indices go between them
        return self.lib.tfn_step(ctypes.byref(shape), ctypes.byref(consts), begin, end, self.frozen_ptrs,
                                 self.frozen_strides, *map(_ptr, data), *(None if r is None else _ptr(r) for r in rows),
                                 *map(_ptr, outputs))


def tfn_outputs(model, x: Tensor) -> Tensor:
    """The outputs of one TFN without adapters (a cell's target: not stacked, not the
    post-norm residual variant) on inputs (..., B, D, N), by the native forward pass: the function
    of ``models.tfn_forward`` to float32 round-off, several times faster at the paper's
    sizes. Raises NativeError where the native step does not apply to the model's sizes."""
    if model.wq.dim() != 4 or model.residual:
        raise NativeError("native forward: one TFN, plain or pre-norm")
    D, N = x.shape[-2:]
    if D != model.width or D not in WIDTHS or not 1 <= N <= MAX_TOKENS:
        raise NativeError(f"native forward: width {D} (one of {WIDTHS}) and {N} tokens (at most {MAX_TOKENS})")
    lib = _build(D, N)
    rows = x.reshape(-1, D, N).transpose(-1, -2).to(torch.float32).contiguous()
    weights = [getattr(model, name).detach().to(torch.float32).contiguous() for name in TFN_FROZEN]
    biases = torch.cat([model.b1.reshape(-1), model.b2.reshape(-1)]).to(torch.float32).contiguous()
    shape = _TfnShape(depth=model.depth, heads=model.n_head, width=D, tokens=N, batch=rows.shape[0],
                      val_batch=0, prenorm=int(model.prenorm), chunk=TFN_CHUNK_SAMPLES,
                      n_param=biases.numel(), off_b1=0,
                      off_b2=model.depth * D)
    out = torch.empty_like(rows)
    pointers = (ctypes.c_void_p * len(weights))(*[t.data_ptr() for t in weights])
    if lib.tfn_forward(ctypes.byref(shape), pointers, _ptr(biases), _ptr(rows), _ptr(out)) != 0:
        raise NativeError("native forward: out of memory or shape out of range")
    return out.transpose(-1, -2).reshape(x.shape)


TFN_DENSE = ("wq", "wk", "wv", "wo", "w1", "w2", "w_out", "b1", "b2")  # tfn_gradients' layout (TfnDense)


def tfn_gradients(model, x: Tensor, y: Tensor, threads: int = 1,
                  with_grad: bool = True) -> tuple[Tensor, Optional[dict[str, Tensor]]]:
    """The mean squared error of C stacked transformers (plain or pre-norm) on inputs x
    (B, D, N) shared, or (C, B, D, N) one batch per configuration, against targets y of
    the same shape: the loss (C,) and, with ``with_grad``, its gradients w.r.t. every
    tensor of the model (TFN_DENSE; zero for a configuration whose loss is not finite).
    A method on the generic path maps these onto its own parameters by the chain rule.
    Raises NativeError where the native step does not apply to the model's sizes."""
    if model.wq.dim() != 5 or model.residual:
        raise NativeError("native gradients: stacked TFNs, plain or pre-norm")
    C, (D, N) = model.wq.shape[0], x.shape[-2:]
    if D != model.width or D not in WIDTHS or not 1 <= N <= MAX_TOKENS or x.shape != y.shape:
        raise NativeError(f"native gradients: width {D} (one of {WIDTHS}), {N} tokens (at most {MAX_TOKENS}) "
                          f"and targets shaped as the inputs")
    if x.dim() not in (3, 4) or (x.dim() == 4 and x.shape[0] != C):
        raise NativeError("native gradients: inputs (B, D, N) or (C, B, D, N)")
    lib = _build(D, N)
    xs, ys = (t.detach().transpose(-1, -2).to(torch.float32).contiguous() for t in (x, y))
    weights = [getattr(model, name).detach().to(torch.float32).contiguous() for name in TFN_FROZEN]
    biases = torch.cat([model.b1.detach().reshape(C, -1), model.b2.detach().reshape(C, -1)], dim=1)
    biases = biases.to(torch.float32).contiguous()
    L = model.depth
    stride = 0 if xs.dim() == 3 else xs[0].numel()
    shape = _TfnShape(depth=L, heads=model.n_head, width=D, tokens=N, batch=xs.shape[-3], val_batch=0,
                      prenorm=int(model.prenorm), chunk=TFN_CHUNK_SAMPLES,
                      n_param=biases.shape[1], off_b1=0, off_b2=L * D, x_stride=stride, y_stride=stride)
    per_config = [t[0].numel() for t in weights]
    sizes = per_config + [L * D, L * D]
    grads = torch.zeros(C, sum(sizes), dtype=torch.float32) if with_grad else None
    loss = torch.empty(C, dtype=torch.float32)
    pointers = (ctypes.c_void_p * len(weights))(*[t.data_ptr() for t in weights])
    strides = (ctypes.c_long * len(weights))(*per_config)

    def run(begin: int, end: int) -> int:
        return lib.tfn_gradients(ctypes.byref(shape), begin, end, pointers, strides, _ptr(biases), _ptr(xs), _ptr(ys),
                                 None, _ptr(loss), None if grads is None else _ptr(grads))

    if any(code != 0 for code in _over_threads(run, C, threads)):
        raise NativeError("native gradients: out of memory or shape out of range")
    if grads is None:
        return loss, None
    parts = grads.split(sizes, dim=1)
    return loss, {name: part.view_as(getattr(model, name)) for name, part in zip(TFN_DENSE, parts)}


def _over_threads(run, C: int, threads: int) -> list[int]:
    """``run(begin, end)`` over configurations [0, C) split into contiguous blocks, one per
    thread (ctypes releases the GIL for the call); the return codes."""
    threads = max(1, min(threads, C))
    bounds = [C * i // threads for i in range(threads + 1)]
    return [run(0, C)] if threads == 1 else list(_pool(threads).map(run, bounds[:-1], bounds[1:]))


@lru_cache(maxsize=None)
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lorabench-native")
