"""Command-line config overrides that refuse unknown keys.

detectron2's ``LazyConfig.apply_overrides`` calls ``OmegaConf.update``, which silently
*creates* a key that does not exist: ``train.max_itr=10`` (a typo) trains for the
config's 90k iterations without a word. :func:`apply_overrides` first checks every
override's key against the loaded config:

* the key exists in the config; or
* its parent is a ``LazyCall`` node and the key is a keyword argument of the called
  object (an argument left at its default in the config file). Where the callable takes
  ``**kwargs``, the names it forwards them to count too: a class's base-class
  ``__init__`` (``SafeDatasetMapper`` -> ``DatasetMapper``, ``StandardROIHeads`` ->
  ``ROIHeads``) and, for the train-loader builders, ``torch.utils.data.DataLoader``
  (``FORWARDED_KWARGS``); only a ``**kwargs`` whose destination is unknown accepts any name; or
* it is one of the optional keys the training script reads (``OPTIONAL_KEYS``); or
* it is written ``+key=value`` (Hydra's "add a new key" syntax): added on purpose.

Otherwise :class:`ConfigOverrideError` names the key and suggests the closest existing ones.
"""
import difflib
import inspect
from typing import Iterable, List, Optional, Sequence

from detectron2.config import LazyConfig
from detectron2.utils.registry import locate
from omegaconf import DictConfig, ListConfig

__all__ = [
    "ConfigOverrideError",
    "ConfigValueError",
    "check_override_keys",
    "apply_overrides",
    "validate_config",
    "OPTIONAL_KEYS",
    "FORWARDED_KWARGS",
]

# Functions whose **kwargs are passed on to another callable: "module.qualname" -> callables.
FORWARDED_KWARGS = {
    "detectron2.data.build.build_detection_train_loader": ("torch.utils.data.DataLoader",),
    "detectron2.data.build.build_detection_test_loader": ("torch.utils.data.DataLoader",),
    "itpn_d2.data.resumable.build_resumable_train_loader": ("torch.utils.data.DataLoader",),
}

# Read by tools/lazyconfig_train_net.py with cfg.train.get(...): valid even where the config lacks them.
OPTIONAL_KEYS = (
    "train.backbone_load", "train.amp.dtype", "train.extra_hooks", "train.seed", "train.cudnn_benchmark",
    "train.compile.enabled", "train.grad_accum_steps", "train.tf32", "train.new_by_design_keys",
)


class ConfigOverrideError(KeyError):
    """A command-line override is malformed or names a key the config does not have."""

    def __str__(self):  # KeyError's str() quotes the message; show it plainly
        return str(self.args[0]) if self.args else ""


class ConfigValueError(ConfigOverrideError):
    """A config value the training script cannot use (e.g. ``train.max_iter=abc`` or ``-5``)."""


def _parse(overrides: Sequence[str]):
    """[(key, is_add, text)] using Hydra's parser when present (as detectron2 does)."""
    out = []
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.core.override_parser.types import OverrideType
    except ImportError:
        for o in overrides:
            if "=" not in o:
                raise ConfigOverrideError(f"config override '{o}' is not of the form key=value")
            key = o.split("=", 1)[0]
            out.append((key.lstrip("+"), key.startswith("+"), o))
        return out
    parser = OverridesParser.create()
    for o in overrides:
        try:
            (parsed,) = parser.parse_overrides([o])
        except Exception as e:  # hydra's OverrideParseException and friends
            raise ConfigOverrideError(
                f"cannot parse the config override '{o}' (expected key=value): {str(e).splitlines()[0]}"
            ) from None
        out.append((parsed.key_or_group, parsed.type == OverrideType.ADD, o))
    return out


def _signature_names(fn):
    """(keyword parameter names, takes **kwargs) of a callable; a class's ``**kwargs`` is followed
    into the ``__init__`` of its base classes, a known forwarding function's into its destination."""
    names, var_kw = [], False
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    var_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
    if not var_kw:
        return names, False
    destinations = []
    if inspect.isclass(fn):
        own = fn.__dict__.get("__init__")
        for base in fn.__mro__[1:]:
            if "__init__" in base.__dict__ and base is not object:
                destinations = [base]
                break
        if own is None:
            destinations = []  # the signature above already is the inherited one
    else:
        key = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', '')}"
        destinations = [locate(d) for d in FORWARDED_KWARGS.get(key, ())]
    if not destinations:
        return names, True
    var_kw = False
    for d in destinations:
        info = _signature_names(d)
        if info is None:
            return names, True
        names += [n for n in info[0] if n not in names]
        var_kw = var_kw or info[1]
    return names, var_kw


def _target_params(node: DictConfig):
    """(keyword parameter names, takes unknown **kwargs) of a LazyCall node's target; None if not a
    LazyCall node or not introspectable."""
    if "_target_" not in node:
        return None
    try:
        target = node._get_node("_target_")._value()
        fn = locate(target) if isinstance(target, str) else target
    except Exception:  # noqa: BLE001 - cannot introspect
        return None
    return _signature_names(fn)


def _target_accepts(node: DictConfig, name: str) -> bool:
    if "_target_" not in node:
        return False
    info = _target_params(node)
    if info is None:
        return True  # cannot introspect: do not block the user
    names, var_kw = info
    return name in names or var_kw


def _children(node) -> List[str]:
    if isinstance(node, DictConfig):
        keys = [str(k) for k in node.keys()]
        info = _target_params(node)
        return keys + [n for n in (info[0] if info else []) if n not in keys]
    if isinstance(node, ListConfig):
        return [str(i) for i in range(len(node))]
    return []


def _unknown_key_message(key: str, text: str, prefix: str, node) -> str:
    choices = [f"{prefix}{c}" if prefix else c for c in _children(node) if c != "_target_"]
    close = difflib.get_close_matches(key, choices, n=3, cutoff=0.6)
    msg = f"unknown config key '{key}' in the command-line override '{text}'"
    if close:
        msg += "; did you mean " + " or ".join(f"'{c}'" for c in close) + "?"
    elif choices:
        shown = ", ".join(choices[:12]) + (", ..." if len(choices) > 12 else "")
        msg += f"; '{prefix.rstrip('.') or '<root>'}' has: {shown}"
    return msg + ("" if msg.endswith("?") else ".") + f" To add a new key on purpose, write '+{text}'."


def _check_key(cfg, key: str, text: str) -> None:
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts):
        prefix = ".".join(parts[:i])
        prefix = prefix + "." if prefix else ""
        if isinstance(node, DictConfig):
            if part in node:
                node = node._get_node(part)  # the node itself: no interpolation is resolved
                continue
            if _target_accepts(node, part):
                return  # an argument the config leaves at its default (deeper keys: the object's business)
            raise ConfigOverrideError(_unknown_key_message(key, text, prefix, node))
        if isinstance(node, ListConfig):
            if part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
                node = node._get_node(int(part))
                continue
            raise ConfigOverrideError(
                f"config key '{key}' in the override '{text}': '{prefix.rstrip('.')}' is a list of "
                f"{len(node)} items; '{part}' is not a valid index"
            )
        try:
            value = repr(node._value())[:60]
        except Exception:  # noqa: BLE001 - only for the message
            value = type(node).__name__
        raise ConfigOverrideError(
            f"config key '{key}' in the override '{text}': '{prefix.rstrip('.')}' is a value "
            f"({value}), not a config node"
        )


def check_override_keys(cfg, overrides: Iterable[str]) -> None:
    """Raise :class:`ConfigOverrideError` for the first malformed override or unknown key."""
    for key, is_add, text in _parse(list(overrides)):
        if text.split("=", 1)[1].strip() in ("None", "none"):
            # hydra's grammar reads None as the string "None", which then fails deep inside a
            # constructor ("'str' object has no attribute ...")
            raise ConfigOverrideError(f"config override '{text}': write {key}=null for None (hydra syntax)")
        if is_add or key in OPTIONAL_KEYS:
            continue
        _check_key(cfg, key, text)


def _value(cfg, key: str):
    node = cfg
    for part in key.split("."):
        if isinstance(node, DictConfig) and part in node:
            node = node[part]
        else:
            return _MISSING
    return node


_MISSING = object()


def _require_int(cfg, key: str, minimum: int, why: str) -> None:
    v = _value(cfg, key)
    if v is _MISSING or v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigValueError(f"config value {key}={v!r} is not an integer ({why})")
    if v < minimum:
        raise ConfigValueError(f"config value {key}={v} must be >= {minimum} ({why})")


def validate_config(cfg, *, eval_only: bool = False) -> None:
    """Refuse values of the training script's own keys that would fail late (a ``TypeError``
    at the first comparison, a ``ZeroDivisionError`` at the first checkpoint) or train nothing
    and exit 0, naming the key and value."""
    if not eval_only:
        _require_int(cfg, "train.max_iter", 1, "the number of training iterations")
    _require_int(cfg, "train.checkpointer.period", 1, "iterations between checkpoints")
    _require_int(cfg, "train.checkpointer.max_to_keep", 1, "checkpoints kept; null keeps all")
    _require_int(cfg, "train.log_period", 1, "iterations between metric writes")
    _require_int(cfg, "train.eval_period", 0, "iterations between evaluations; 0 evaluates at the end only")
    _require_int(cfg, "dataloader.train.total_batch_size", 1, "images per step over all processes")
    _require_int(cfg, "dataloader.train.num_workers", 0, "data-loading processes per training process")
    out = _value(cfg, "train.output_dir")
    if out is not _MISSING and not (isinstance(out, str) and out):
        raise ConfigValueError(f"config value train.output_dir={out!r} must be a folder path")


def apply_overrides(cfg, overrides: Optional[Sequence[str]]):
    """:func:`check_override_keys`, then detectron2's ``LazyConfig.apply_overrides``."""
    overrides = list(overrides or [])
    check_override_keys(cfg, overrides)
    try:
        return LazyConfig.apply_overrides(cfg, overrides)
    except Exception as e:  # e.g. "Trying to update key a.b, but a is not a config"
        raise ConfigOverrideError(f"cannot apply the config overrides {overrides}: {e}") from None
