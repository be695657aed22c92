"""``torch.compile`` as a config switch (``train.compile``).

Only the tensor-heavy submodules are compiled, each in place with ``nn.Module.compile``:

* in place, so parameter names (and therefore checkpoints, the pre-training -> detection
  key mapping and DDP) are exactly those of the eager model: ``torch.compile(model)``
  would wrap it and prefix every key with ``_orig_mod.``;
* submodules, not the whole meta-architecture, because the meta-architectures' ``forward``
  is Python bookkeeping (masks drawn from seeds, event-storage scalars, an iteration
  counter, detectron2's proposal sampling) that either breaks the graph or changes every
  step and would make dynamo recompile until it gives up.

The default paths cover the backbone of every model here, the pre-training decoders and
the teacher. A module that knows better than its ``__call__`` what to compile says so with
its own ``compile(**options)`` returning the names (relative to it) it compiled:
``ITPNBackbone`` compiles its encoder and pyramid (pre-training enters it through
``forward_units``, not ``__call__``), the EMA teacher its averaged backbone's, an external
teacher nothing. Paths that a model does not have, or that are ``None`` (e.g. no MFM decoder),
are skipped.
"""
import logging
from typing import Dict, List, Optional, Sequence

import torch.nn as nn

__all__ = ["DEFAULT_COMPILE_MODULES", "compile_modules", "maybe_compile"]

logger = logging.getLogger(__name__)

DEFAULT_COMPILE_MODULES = ("backbone", "pixel_decoder", "mfm_decoder", "teacher")


def _lookup(model: nn.Module, path: str) -> Optional[object]:
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def compile_modules(
    model: nn.Module, modules: Sequence[str] = DEFAULT_COMPILE_MODULES, **options
) -> List[str]:
    """Compile each submodule named by a dotted path in ``modules`` in place
    (``nn.Module.compile(**options)``, or the module's own ``compile`` override; ``options`` are
    ``torch.compile``'s: ``backend``, ``mode``, ``dynamic``, ``fullgraph``...). Returns the dotted
    paths of the modules compiled.

    Raises ValueError if none of the paths exists (a typo would otherwise silently leave the
    model eager), and TypeError if a path names something that is not a module.
    """
    done, found = [], False
    for path in modules:
        sub = _lookup(model, path)
        if sub is None:
            continue
        found = True
        if not isinstance(sub, nn.Module):
            raise TypeError(f"train.compile.modules: '{path}' is a {type(sub).__name__}, not an nn.Module")
        inner = sub.compile(**options)  # nn.Module.compile returns None: the module itself
        done += [f"{path}.{name}" for name in inner] if inner is not None else [path]
    if not found:
        raise ValueError(
            f"train.compile.modules: none of {list(modules)} exists in {type(model).__name__}; "
            "give dotted paths of its submodules (e.g. backbone)"
        )
    return done


def maybe_compile(model: nn.Module, compile_cfg: Optional[Dict]) -> List[str]:
    """Apply ``train.compile`` (a dict: ``enabled``, optional ``modules`` and ``options``) to
    ``model``; a no-op when it is absent or disabled."""
    if not compile_cfg or not compile_cfg.get("enabled", False):
        return []
    modules = compile_cfg.get("modules", None) or DEFAULT_COMPILE_MODULES
    options = dict(compile_cfg.get("options", None) or {})
    if options.get("dynamic", None) is None and not hasattr(model, "mask_generator"):
        # Detection / segmentation see a new image size at almost every step (multi-scale
        # training, evaluation sizes). Left to dynamo (dynamic=None) the first size is compiled
        # static and each of the next ones costs a recompilation until it marks the sizes
        # dynamic itself; compiling dynamic from the start saves those (tiny Mask R-CNN, 4
        # training sizes: 3 compiled frames instead of 5). Pre-training crops have one size.
        options["dynamic"] = True
    done = compile_modules(model, modules, **options)
    logger.info(f"torch.compile ({options or 'default options'}) on: {', '.join(done)}")
    return done
