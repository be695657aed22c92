"""Masking of 16x16-pixel mask units for masked image / feature modelling.

Both generators return the same thing, so the pre-trainer treats them alike:

    ids_keep: (B, N_vis) long, the kept units' raster indices, sorted ascending
    mask:     (B, N) bool, True where a unit is masked

with N = h * w units and exactly the same number of masked units in every sample
(so the kept sequences stack into one tensor and the encoder can *drop* masked
units before its first block, whichever generator made the mask). Block-wise
masking therefore does not leak, unlike the official CLIP code that keeps the
masked units in stages 1/2 and only replaces their stride-16 tokens.

Randomness comes from an optional ``torch.Generator``; with one seeded, the masks
are reproducible.
"""
import math
from typing import Optional, Tuple

import torch

__all__ = ["num_masked_units", "RandomMaskGenerator", "BlockMaskGenerator", "mask_to_ids_keep", "mask_from_seed"]


def num_masked_units(num_units: int, mask_ratio: float) -> int:
    """Units to mask out of ``num_units``: ``N - int(N * (1 - ratio))`` as in MAE / iTPN
    (196 units at 0.75 keep 49), but at least one kept and, for ratio > 0, one masked."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    # The epsilon keeps ratios such as 75/196 from flooring one unit short.
    keep = int(num_units * (1.0 - mask_ratio) + 1e-6)
    keep = min(max(keep, 1), num_units)
    if mask_ratio > 0 and keep == num_units and num_units > 1:
        keep = num_units - 1
    return num_units - keep


def mask_to_ids_keep(mask: torch.Tensor) -> torch.Tensor:
    """(B, N) bool mask with equal counts per row -> (B, N_vis) sorted kept indices."""
    counts = (~mask).sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError(f"every sample must keep the same number of units, got {counts.tolist()}")
    # A stable sort of the mask puts the kept (False) units first in raster order.
    order = torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices
    return order[:, : int(counts[0])]


def mask_from_seed(mask_generator, grid: Tuple[int, int], mask_ratio: float, seed: int):
    """One sample's mask, a function of ``seed`` alone: ``mask_generator`` draws it on the CPU
    from a ``torch.Generator`` seeded with ``seed``.

    The pre-trainer (:meth:`~itpn_d2.modeling.MaskedPretrainer.make_mask_from_seeds`) and the
    DataLoader workers (:func:`itpn_d2.data.resumable.attach_mask_generator`) both call this,
    so a mask drawn in a worker is the very mask the model would draw from the same seed.

    Returns:
        ids_keep: (N_vis,) long, sorted; mask: (N,) bool, True = masked; both on the CPU.
    """
    gen = torch.Generator().manual_seed(int(seed))
    ids_keep, mask = mask_generator(1, grid, mask_ratio, device=torch.device("cpu"), generator=gen)
    return ids_keep[0], mask[0]


def _rand(shape, generator: Optional[torch.Generator], device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


class RandomMaskGenerator:
    """MAE-style uniform random masking: every sample masks exactly
    ``num_masked_units(N, mask_ratio)`` units chosen uniformly without replacement."""

    def __call__(
        self,
        batch_size: int,
        grid: Tuple[int, int],
        mask_ratio: float,
        *,
        device=None,
        generator: Optional[torch.Generator] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns ``ids_keep`` (B, N_vis) long sorted and ``mask`` (B, N) bool, N = h*w."""
        n = grid[0] * grid[1]
        keep = n - num_masked_units(n, mask_ratio)
        noise = _rand((batch_size, n), generator, device)
        ids_keep = torch.argsort(noise, dim=1)[:, :keep].sort(dim=1).values
        mask = torch.ones(batch_size, n, dtype=torch.bool, device=ids_keep.device)
        mask.scatter_(1, ids_keep, False)
        return ids_keep, mask


class BlockMaskGenerator:
    """BEiT-style block-wise masking with an exact count per sample.

    Rectangular blocks (area uniform in [``min_block``, remaining budget], aspect
    ratio log-uniform in [``min_aspect``, 1/``min_aspect``]) are added as in BEiT
    until the target count is reached; BEiT may stop short when no block fits, so
    the remainder is filled with uniformly random units. Counts are therefore exact
    and equal across the batch, which lets the encoder drop masked units.
    The loops run on the CPU (grids are small); results move to ``device``.
    """

    def __init__(self, *, min_block: int = 16, min_aspect: float = 0.3, max_block: Optional[int] = None,
                 max_attempts: int = 10):
        """
        Args:
            min_block: smallest block area in units (BEiT: 16 on a 14x14 grid).
            min_aspect: blocks have aspect ratio in [min_aspect, 1 / min_aspect].
            max_block: largest block area; None for the whole budget.
            max_attempts: tries per block before giving up on a fitting block.
        """
        self.min_block = min_block
        self.max_block = max_block
        self.log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))
        self.max_attempts = max_attempts

    def _one(self, grid, target: int, gen: Optional[torch.Generator]) -> torch.Tensor:
        h, w = grid
        m = torch.zeros(h, w, dtype=torch.bool)

        def u(a, b):
            return a + (b - a) * float(torch.rand((), generator=gen))

        count = 0
        while count < target:
            budget = target - count
            if self.max_block is not None:
                budget = min(budget, self.max_block)
            added = 0
            for _ in range(self.max_attempts):
                area = u(min(self.min_block, budget), budget)
                aspect = math.exp(u(*self.log_aspect))
                bh = int(round(math.sqrt(area * aspect)))
                bw = int(round(math.sqrt(area / aspect)))
                if 0 < bh < h and 0 < bw < w:
                    top = int(torch.randint(0, h - bh + 1, (), generator=gen))
                    left = int(torch.randint(0, w - bw + 1, (), generator=gen))
                    block = m[top : top + bh, left : left + bw]
                    new = bh * bw - int(block.sum())
                    if 0 < new <= budget:
                        block.fill_(True)
                        added = new
                        break
            if added == 0:
                break
            count += added
        if count < target:  # top up with random units
            free = (~m).flatten().nonzero().squeeze(1)
            pick = free[torch.randperm(free.numel(), generator=gen)[: target - count]]
            m.view(-1)[pick] = True
        return m.flatten()

    def __call__(
        self,
        batch_size: int,
        grid: Tuple[int, int],
        mask_ratio: float,
        *,
        device=None,
        generator: Optional[torch.Generator] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns ``ids_keep`` (B, N_vis) long sorted and ``mask`` (B, N) bool, N = h*w."""
        if generator is not None and generator.device.type != "cpu":
            raise ValueError("BlockMaskGenerator samples on the CPU: pass a CPU torch.Generator")
        n = grid[0] * grid[1]
        target = num_masked_units(n, mask_ratio)
        mask = torch.stack([self._one(grid, target, generator) for _ in range(batch_size)])
        mask = mask.to(device) if device is not None else mask
        return mask_to_ids_keep(mask), mask
