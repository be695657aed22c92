from .object_labels import ObjectLabelEvaluator
from .sem_seg import build_sem_seg_evaluator, sem_seg_loading_fn

__all__ = ["ObjectLabelEvaluator", "build_sem_seg_evaluator", "sem_seg_loading_fn"]
