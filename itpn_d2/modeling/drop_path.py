"""Stochastic depth whose per-sample decisions can be a function of the sample, not of the process.

timm's ``DropPath`` draws each sample's keep/drop decision from the process-global RNG.
That stream is seeded per rank and is not in any checkpoint, so a resumed run and a run
on another number of processes drop other paths for the same image. :class:`DropPath`
here is the same operation (same arguments, no parameters, so checkpoints are unchanged),
with one difference: while a *step key* is set (:func:`set_drop_path_step`, done by the
training hook :class:`itpn_d2.engine.determinism.DeterministicStepRNG` before each step),
the decision for sample ``j`` of this process's batch is a hash of

    (seed, iteration, global sample index = rank * local_batch_size + j, layer, branch)

which every process computes the same way for the same global sample. Without a step key
(plain ``model(batch)`` calls, tests, other trainers) it draws from torch's RNG like timm's.
"""
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

__all__ = ["DropPath", "DropPathStep", "set_drop_path_step", "get_drop_path_step", "keyed_uniform"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    # splitmix64's finaliser: a bijection of uint64 with full avalanche (wrapping arithmetic is intended)
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def keyed_uniform(*keys, index: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) float64 values, one per entry of ``index`` (non-negative ints), each a
    fixed function of ``keys`` (non-negative ints) and that entry: no RNG state is involved."""
    with np.errstate(over="ignore"):
        h = np.full(np.shape(index), _GOLDEN, dtype=np.uint64)
        for k in (*keys, index):
            h = _mix64(h ^ _mix64(np.asarray(k, dtype=np.uint64) + _GOLDEN))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass(frozen=True)
class DropPathStep:
    """The key of one training step: every process of the run sets the same ``seed`` and
    ``iteration``, and its own ``rank`` (its samples are ``rank * B .. rank * B + B - 1`` of
    the global batch, ``B`` its local batch size, equal on all ranks as detectron2's loaders make it)."""

    seed: int
    iteration: int
    rank: int = 0


# Process-wide, not thread-local: activation checkpointing may recompute a block in backward
# on autograd's device thread, and the recomputed decisions must be the forward's.
_step: Optional[DropPathStep] = None


def set_drop_path_step(step: Optional[DropPathStep]) -> None:
    """Set (or clear, with ``None``) the step key used by every :class:`DropPath` of this process."""
    global _step
    _step = step


def get_drop_path_step() -> Optional[DropPathStep]:
    return _step


class DropPath(nn.Module):
    """Drop the residual branch per sample with probability ``drop_prob`` (stochastic depth),
    scaling kept samples by ``1 / (1 - drop_prob)``; the identity in eval mode.

    ``layer_id`` (set by the owning network, e.g. :class:`~itpn_d2.modeling.HiViT`) and the
    ``branch`` argument of ``forward`` (0 / 1 for the two residual branches of a transformer
    block) make the decisions of different branches independent under a step key.
    """

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True, layer_id: int = 0):
        super().__init__()
        self.drop_prob = float(drop_prob)
        self.scale_by_keep = scale_by_keep
        self.layer_id = int(layer_id)

    # Run eagerly under torch.compile (train.compile): dynamo cannot trace the uint64 hashing (it
    # fails with KeyError(torch.uint64)), and a traced step key would be a constant, recompiled every
    # step. The graph breaks here and the mask enters the next graph as an input.
    @torch.compiler.disable
    def keep_mask(self, batch_size: int, device, dtype, branch: int = 0) -> torch.Tensor:
        """(batch_size,) 0/1 keep decisions in ``dtype`` (see the module docstring)."""
        keep_prob = 1.0 - self.drop_prob
        step = get_drop_path_step()
        if step is None:
            return torch.empty(batch_size, device=device, dtype=dtype).bernoulli_(keep_prob)
        index = step.rank * batch_size + np.arange(batch_size, dtype=np.uint64)
        u = keyed_uniform(step.seed, step.iteration, self.layer_id, branch, index=index)
        mask = torch.from_numpy(u < keep_prob)
        if torch.device(device).type == "cuda":
            # From pageable memory a host-to-device copy waits for all queued GPU work (a sync per
            # DropPath per step, ~50 in a base Mask R-CNN forward); from pinned memory it is queued
            # like a kernel, and torch's caching host allocator keeps the buffer until it is done.
            mask = mask.pin_memory().to(device, non_blocking=True)
        return mask.to(device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, branch: int = 0) -> torch.Tensor:
        """x: (B, ...) with the samples on dim 0; returns the same shape."""
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        mask = self.keep_mask(x.shape[0], x.device, x.dtype, branch)
        if keep_prob > 0.0 and self.scale_by_keep:
            mask = mask / keep_prob
        return x * mask.view((x.shape[0],) + (1,) * (x.ndim - 1))

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"
