"""The mask unit and the pyramid levels, defined once.

An image is cut into ``UNIT_SIZE x UNIT_SIZE``-pixel mask units. Encoder and pyramid
work on three levels, named as detectron2 names feature maps (``p<i>`` has stride
``2**i``); in unit layout a level has ``tokens_per_unit_side**2`` tokens per unit:

    name  stride  tokens per unit side  encoder stage  unit-layout shape
    p2    4       4                     c2 (C/4)       (B, N, 4, 4, D)
    p3    8       2                     c3 (C/2)       (B, N, 2, 2, D)
    p4    16      1                     c4 (C)         (B, N, 1, 1, D)

Every level tuple in this package (encoder outputs, pyramid outputs, decoder inputs
and outputs, teacher targets) is in this order.
"""
from dataclasses import dataclass
from typing import Dict, Tuple

__all__ = ["UNIT_SIZE", "PyramidLevel", "PYRAMID_LEVELS", "LEVEL_NAMES", "LEVELS_BY_NAME", "LEVELS_BY_STRIDE"]

UNIT_SIZE = 16


@dataclass(frozen=True)
class PyramidLevel:
    """One pyramid level: its detectron2 name, stride in pixels and tokens per unit side."""

    name: str
    stride: int
    tokens_per_unit_side: int

    @property
    def encoder_name(self) -> str:
        """The name of the encoder map at this stride (``c2`` for ``p2``)."""
        return "c" + self.name[1:]


PYRAMID_LEVELS: Tuple[PyramidLevel, ...] = tuple(
    PyramidLevel(name=f"p{i}", stride=2**i, tokens_per_unit_side=UNIT_SIZE // 2**i) for i in (2, 3, 4)
)
LEVEL_NAMES: Tuple[str, ...] = tuple(lv.name for lv in PYRAMID_LEVELS)
LEVELS_BY_NAME: Dict[str, PyramidLevel] = {lv.name: lv for lv in PYRAMID_LEVELS}
LEVELS_BY_STRIDE: Dict[int, PyramidLevel] = {lv.stride: lv for lv in PYRAMID_LEVELS}
