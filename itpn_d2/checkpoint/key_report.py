"""Comparing the keys of a state dict with a model's, and listing them in error messages.

Used by :class:`~itpn_d2.checkpoint.ITPNCheckpointer` before it loads a backbone and by the
converter's :func:`~itpn_d2.checkpoint.convert.verify`, so both refuse a file with the same
report: missing keys, shape mismatches (name, checkpoint shape, model shape), unexpected keys.
"""
from typing import Dict, Iterable, List, Sequence, Tuple

import torch

__all__ = ["compare_state_dicts", "format_key_report", "list_keys"]


def list_keys(keys: Sequence[str], n: int = 20) -> str:
    """The first ``n`` names, comma-separated, and how many there are in all."""
    keys = list(keys)
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > n else f" ({len(keys)})")


def _shape(t) -> Tuple[int, ...]:
    return tuple(t.shape)


def compare_state_dicts(
    model_sd: Dict[str, torch.Tensor], ckpt_sd: Dict[str, torch.Tensor], prefixes: Sequence[str]
) -> Tuple[List[str], List[Tuple[str, tuple, tuple]], List[str]]:
    """Compare the keys under ``prefixes``.

    Returns:
        missing: model keys absent from the checkpoint;
        mismatched: (key, checkpoint shape, model shape) for keys in both with different shapes;
        unexpected: checkpoint keys absent from the model.
    """

    def sel(sd):
        return {k: v for k, v in sd.items() if any(k.startswith(p) for p in prefixes)}

    m, c = sel(model_sd), sel(ckpt_sd)
    missing = sorted(k for k in m if k not in c)
    unexpected = sorted(k for k in c if k not in m)
    mismatched = sorted((k, _shape(c[k]), _shape(m[k])) for k in m if k in c and _shape(c[k]) != _shape(m[k]))
    return missing, mismatched, unexpected


def format_key_report(
    missing: Iterable[str], mismatched: Iterable[Tuple[str, tuple, tuple]], unexpected: Iterable[str]
) -> str:
    """The three lists of :func:`compare_state_dicts` as indented lines, one key a line."""
    lines = []
    missing, mismatched, unexpected = list(missing), list(mismatched), list(unexpected)
    if missing:
        lines.append(f"  missing in the checkpoint ({len(missing)}):")
        lines += [f"    {k}" for k in missing]
    if mismatched:
        lines.append(f"  shape mismatch ({len(mismatched)}): name, checkpoint shape, model shape")
        lines += [f"    {k}: {tuple(cs)} vs {tuple(ms)}" for k, cs, ms in mismatched]
    if unexpected:
        lines.append(f"  in the checkpoint but not in the model ({len(unexpected)}):")
        lines += [f"    {k}" for k in unexpected]
    return "\n".join(lines)
