"""Explicit random-number generators: never the global torch state.

The paper protocol derives one generator per (seed, purpose), so a stream (the test set,
the training batches, the LoRA initialisation) does not depend on what else was drawn
before it or in the same process. The reference protocol instead replays the single global
stream of the authors' code, which is a CPU generator seeded with ``seed``.
"""

from __future__ import annotations

import hashlib

import torch


def derived_seed(seed: int, purpose: str) -> int:
    digest = hashlib.sha256(f"lorabench/{seed}/{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, purpose: str) -> torch.Generator:
    """A CPU generator for one purpose of one seed (paper protocol)."""
    return torch.Generator().manual_seed(derived_seed(seed, purpose))


def global_stream(seed: int) -> torch.Generator:
    """The generator the authors' ``set_seed(seed)`` leaves torch's CPU default in."""
    return torch.Generator().manual_seed(seed)
