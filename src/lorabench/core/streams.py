"""The training data of a cell, step by step: training batch, dropout masks, validation.

A stream answers, every step and in this order, ``train_batch(step)``, ``dropout()`` and
``val_batch()``, and is told which configurations improved (``observe``): the authors'
streams depend on it. A batch is an (inputs, targets) pair, stacked (a leading
configuration dimension C) or shared by the cell (none), or SharedRows.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from . import data, rng
from .config import RunConfig
from .generation import dropout_with
from .models import forward


@dataclass(frozen=True)
class SharedRows:
    """A batch per configuration, as rows of a few distinct batches: configuration c reads
    ``x[row[c]]`` and ``y[row[c]]`` (the native step reads them in place, no (C, ...) copy)."""

    x: Tensor  # (K, ...): K distinct batches (a stream's pool of kept ones)
    y: Tensor  # (K, ...)
    row: Tensor  # (C,) long, on the CPU


Batch = Union[tuple[Tensor, Tensor], SharedRows]
TargetOutputs = Callable[[Tensor], Tensor]  # the target's outputs on a batch of inputs


def stacked(batch: Batch) -> tuple[Tensor, Tensor]:
    """A batch as (inputs, targets): shared by the cell, or (C, ...) one per configuration."""
    if isinstance(batch, SharedRows):
        row = batch.row.to(batch.x.device)
        # contiguous: the torch path's products see the layout of freshly drawn batches
        return batch.x[row].contiguous(), batch.y[row].contiguous()
    return batch


def _target_outputs(target, x: Tensor) -> Tensor:
    with torch.no_grad():
        return forward(target, x)


class PaperStream:
    """Fresh batches shared by the whole cell (or the fixed finite training set), a fixed
    validation set, dropout masks shared by all configurations of a step."""

    def __init__(self, cfg: RunConfig, target, sets: data.EvalSets, x_train: Optional[Tensor], device):
        self.cfg, self.target, self.device = cfg, target, device
        self.gen = rng.generator(cfg.seed, "train")
        self.drop_gen = rng.generator(cfg.seed, "dropout")
        self.fixed = None
        if x_train is not None:
            x = x_train.to(device)
            self.fixed = (x, _target_outputs(target, x))
        self.val_x = sets.val.to(device)
        self.val_y = _target_outputs(target, self.val_x)

    def train_batch(self, step: int) -> tuple[Tensor, Tensor]:
        if self.fixed is not None:
            return self.fixed
        x = data.draw(self.cfg, self.cfg.batch_size, self.gen).to(self.device)
        return x, _target_outputs(self.target, x)

    def dropout(self):
        if not self.cfg.better_optim:
            return None
        gen, p = self.drop_gen, self.cfg.dropout

        def drop(x: Tensor, token_major: bool) -> Tensor:
            # One mask per step shared by every config: a config's numbers then do not
            # depend on which others share its cell.
            noise = torch.empty(x.shape[-3:]).bernoulli_(1 - p, generator=gen).div_(1 - p)
            return x * noise.to(x.device)

        return drop

    def val_batch(self) -> tuple[Tensor, Tensor]:
        return self.val_x, self.val_y

    def observe(self, improved: Tensor) -> None:
        pass


def reference_fnn_batches(cfg: RunConfig) -> Tensor:
    """The only training batches the authors' FNN loop ever sees, stacked (3, B, D).

    Their validation and test functions reset the global seed, so after step 0 (batch 0,
    the first draws after the seed, which is also the validation set) the next batch is
    either the draws following a test (1: the config's validation loss improved at the
    previous step) or those following a validation (2: it did not).
    """
    gen = rng.global_stream(cfg.seed)
    first = data.draw(cfg, cfg.batch_size, gen)
    after_validation = data.draw(cfg, cfg.batch_size, gen)
    gen = rng.global_stream(cfg.seed)
    data.draw(cfg, cfg.n_test, gen)
    data.draw(cfg, cfg.n_test, gen)
    after_test = data.draw(cfg, cfg.batch_size, gen)
    return torch.stack([first, after_test, after_validation])


def reference_tfn_state_after_test(cfg: RunConfig) -> torch.Tensor:
    """Generator state the authors' TFN stream resumes from after each test evaluation."""
    gen = rng.global_stream(cfg.seed)
    data.draw(cfg, cfg.n_test, gen)
    data.draw(cfg, cfg.n_test, gen)
    return gen.get_state()


class ReferenceFNNStream:
    """The authors' FNN data: after step 0 each config trains on one of two fixed batches,
    chosen by whether its validation improved at the previous step (see
    reference_fnn_batches); validation on the first training batch."""

    def __init__(self, cfg: RunConfig, target, sets: data.EvalSets, x_train: Optional[Tensor], C: int, device):
        self.fixed = None
        if x_train is not None:  # per-config finite sets (C, n, D)
            x = x_train.to(device)
            self.fixed = (x, _target_outputs(target, x))
        self.batches = reference_fnn_batches(cfg).to(device)
        self.targets = _target_outputs(target, self.batches)
        self.choice = torch.zeros(C, dtype=torch.long, device=device)
        self.val_x = sets.val.to(device)
        self.val_y = _target_outputs(target, self.val_x)

    def train_batch(self, step: int):
        if self.fixed is not None:
            return self.fixed
        return self.batches[self.choice], self.targets[self.choice]

    def dropout(self):
        return None

    def val_batch(self):
        return self.val_x, self.val_y

    def observe(self, improved: Tensor) -> None:
        self.choice = torch.where(improved, 1, 2)


class ReferenceTFNStream:
    """The authors' TFN data: each config's own global stream; training batch and
    validation batch drawn in turn every step (the validation batch alone with a finite
    training set), and the stream rewound to the position after the test sets whenever
    the config's validation improves.

    A config's batches are therefore fixed by its origin (the seed, until its first
    improvement, or the position after the test sets) and the steps since it: configs
    at the same position share the batch and its target outputs, drawn once. Drawn
    positions are kept, up to KEPT_BYTES, for the configs that reach them later (see
    _evict); others are drawn again from their saved generator state.

    Kept positions live in slots of one pool per tensor (training inputs and targets,
    validation inputs and targets), stored as token rows (slots, B, N, D), the native
    step's layout, and handed out as (slots, B, D, N) views with each config's slot: a
    step copies nothing, however far apart the configs have drifted.
    """

    SEED, AFTER_TEST = 0, 1
    KEPT_BYTES = 512 * 2**20  # ~800 positions at the paper's sizes (0.65 MB each)

    def __init__(self, cfg: RunConfig, target, x_train: Optional[Tensor], C: int, device,
                 target_outputs: Optional[TargetOutputs] = None):
        self.cfg, self.device = cfg, device
        # Most of the stream's cost: each position's batches are new inputs to the target.
        self.target_outputs = target_outputs or partial(_target_outputs, target)
        self.fixed = None
        if x_train is not None:
            x = x_train.to(device)
            self.fixed = (x, self.target_outputs(x))
        origins = (rng.global_stream(cfg.seed).get_state(), reference_tfn_state_after_test(cfg))
        self.states = [[state] for state in origins]  # generator state at each position
        self.slot: dict[tuple[int, int], int] = {}  # kept position -> its slot in the pools
        self.free: list[int] = []
        self.pools: Optional[list[Tensor]] = None  # (train x, train y, val x, val y) token rows; train None if fixed
        self.drawn = 0  # positions drawn (and evaluated), a measure of the stream's cost
        self.origin = torch.full((C,), self.SEED, dtype=torch.long)
        self.since = torch.zeros(C, dtype=torch.long)

    def _draws(self, position: tuple[int, int]) -> int:
        """The slot that holds a position's batches (training batch, unless fixed, and
        validation batch, inputs with their targets), drawn there if not kept."""
        if position in self.slot:
            return self.slot[position]
        origin, k = position
        states = self.states[origin]
        gen = torch.Generator()
        gen.set_state(states[min(k, len(states) - 1)])
        for _ in range(len(states) - 1, k):  # never runs: positions advance one step at a time
            self._draw_inputs(gen)
            states.append(gen.get_state())
        inputs = self._draw_inputs(gen)
        if len(states) == k + 1:
            states.append(gen.get_state())
        tensors = [t for x in inputs for t in ((None, None) if x is None else (x, self.target_outputs(x)))]
        slot = self._free_slot(tensors)
        for pool, t in zip(self.pools, tensors):
            if t is not None:
                pool[slot].copy_(t.transpose(-1, -2))
        self.slot[position] = slot
        self.drawn += 1
        return slot

    def _free_slot(self, tensors: list[Optional[Tensor]]) -> int:
        """A free slot, the pools grown when none is left: doubled, up to what KEPT_BYTES
        keeps plus a step's new positions (one per config)."""
        if not self.free:
            size = 0 if self.pools is None else len(next(p for p in self.pools if p is not None))
            limit = self._kept_positions(tensors) + len(self.origin)
            grown = max(size + 1, min(max(8, 2 * size), limit))
            pools = [None if t is None else torch.empty((grown, *t.shape[:-2], t.shape[-1], t.shape[-2]),
                                                         dtype=t.dtype, device=t.device) for t in tensors]
            if self.pools is not None:
                for new, old in zip(pools, self.pools):
                    if new is not None:
                        new[:size].copy_(old)
            self.pools = pools
            self.free = list(range(grown - 1, size - 1, -1))
        return self.free.pop()

    def _kept_positions(self, position: list[Optional[Tensor]]) -> int:
        """How many positions KEPT_BYTES holds, a position being these tensors."""
        each = sum(t.nelement() * t.element_size() for t in position if t is not None)
        return max(1, self.KEPT_BYTES // max(each, 1))

    def _evict(self) -> None:
        """Drop the kept positions asked for farthest ahead until KEPT_BYTES hold the rest.
        A config at step k of an origin asks for k + 1 next unless its validation
        improves, so a kept position is next asked for by the nearest config at or below
        it, or, after the test sets, by a config improving from now on, k + 1 steps
        ahead at most (Belady's rule, with improvements taken as they come)."""
        if not self.slot:
            return
        excess = len(self.slot) - self._kept_positions([p[0] for p in self.pools if p is not None])
        if excess <= 0:
            return
        positions = list(self.slot)
        ahead = next_use(positions, self.origin, self.since, restart=self.AFTER_TEST)
        for i in torch.argsort(ahead, descending=True, stable=True)[:excess].tolist():
            self.free.append(self.slot.pop(positions[i]))

    def _draw_inputs(self, gen: torch.Generator):
        train = None if self.fixed is not None else data.draw(self.cfg, self.cfg.batch_size, gen)
        val = data.draw(self.cfg, self.cfg.batch_size, gen)
        return tuple(None if x is None else x.to(self.device) for x in (train, val))

    def _rows(self, which: int) -> SharedRows:
        slots = [self._draws(position) for position in zip(self.origin.tolist(), self.since.tolist())]
        x, y = (self.pools[2 * which + i].transpose(-1, -2) for i in (0, 1))
        return SharedRows(x, y, torch.tensor(slots, dtype=torch.long))

    def train_batch(self, step: int):
        if self.fixed is not None:
            return self.fixed
        return self._rows(0)

    def dropout(self):
        return None  # the residual variant with dropout: ReferenceTFNDropoutStream

    def val_batch(self):
        batch = self._rows(1)
        self.since += 1  # every config has drawn this step's batches
        return batch

    def observe(self, improved: Tensor) -> None:
        improved = improved.cpu()
        self.origin = torch.where(improved, self.AFTER_TEST, self.origin)
        self.since = torch.where(improved, 0, self.since)
        self._evict()


def next_use(positions: list[tuple[int, int]], origin: Tensor, since: Tensor, restart: int) -> Tensor:
    """Steps until a config next asks for each (origin, k) position, configs being at
    (origin[c], since[c]) and each moving one step on per step: k minus the largest
    since <= k among the configs of that origin; for the ``restart`` origin (where an
    improving config starts again) at most k + 1; inf where no config will ask."""
    at = torch.tensor([o for o, _ in positions], dtype=torch.long)
    k = torch.tensor([step for _, step in positions], dtype=torch.long)
    ahead = torch.full((len(positions),), float("inf"), dtype=torch.float64)
    for o in at.unique().tolist():
        mine = at == o
        ks = k[mine]
        steps = (ks + 1).double() if o == restart else torch.full(ks.shape, float("inf"), dtype=torch.float64)
        walkers = since[origin == o].unique()  # sorted
        if len(walkers):
            i = torch.searchsorted(walkers, ks, right=True)  # walkers at or below k
            below = walkers[(i - 1).clamp(min=0)]
            steps = torch.where(i > 0, torch.minimum(steps, (ks - below).double()), steps)
        ahead[mine] = steps
    return ahead


class ReferenceTFNDropoutStream:
    """ReferenceTFNStream for the residual variant, whose dropout masks are drawn from the
    same streams between the training and the validation batch, as many as its forward
    pass asks for: each config's generator is kept and drawn from in turn."""

    def __init__(self, cfg: RunConfig, target, x_train: Optional[Tensor], C: int, device):
        self.cfg, self.target, self.device = cfg, target, device
        self.gens = [rng.global_stream(cfg.seed) for _ in range(C)]
        self.after_test = reference_tfn_state_after_test(cfg)
        self.fixed = None
        if x_train is not None:
            x = x_train.to(device)
            self.fixed = (x, _target_outputs(target, x))

    def train_batch(self, step: int):
        if self.fixed is not None:
            return self.fixed
        x = torch.stack([data.draw(self.cfg, self.cfg.batch_size, g) for g in self.gens]).to(self.device)
        return x, _target_outputs(self.target, x)

    def dropout(self):
        drops = [dropout_with(g, self.cfg.dropout) for g in self.gens]

        def drop(x: Tensor, token_major: bool) -> Tensor:
            return torch.stack([d(x[c].cpu(), token_major) for c, d in enumerate(drops)]).to(x.device)

        return drop

    def val_batch(self):
        x = torch.stack([data.draw(self.cfg, self.cfg.batch_size, g) for g in self.gens]).to(self.device)
        return x, _target_outputs(self.target, x)

    def observe(self, improved: Tensor) -> None:
        for c in torch.nonzero(improved).flatten().tolist():
            self.gens[c].set_state(self.after_test.clone())
