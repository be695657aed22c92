"""Reading a run's ``metrics.json`` (detectron2's ``JSONWriter``: one JSON object per line).

A resumed run appends records for iterations it had already logged, and a killed run may leave
its last line cut short; both readers below take that into account, so every tool that reports
a run's figures (main job, GPU check, ablation) reads the file the same way.
"""
import json
import os
from typing import Dict, List

__all__ = ["read_metrics", "merged_metrics"]


def read_metrics(output_dir: str) -> List[Dict]:
    """One record per iteration, in iteration order: the records logged for an iteration merged,
    later ones winning (a resumed run's). A missing file gives ``[]``; a cut line is skipped."""
    path = os.path.join(output_dir, "metrics.json")
    by_iter: Dict[int, Dict] = {}
    if not os.path.exists(path):
        return []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if "iteration" in record:
                by_iter.setdefault(record["iteration"], {}).update(record)
    return [by_iter[i] for i in sorted(by_iter)]


def merged_metrics(output_dir: str) -> Dict:
    """The latest value of every key of the run (e.g. the final ``bbox/AP`` next to the last
    ``total_loss``): :func:`read_metrics` merged in iteration order."""
    merged: Dict = {}
    for record in read_metrics(output_dir):
        merged.update(record)
    return merged
