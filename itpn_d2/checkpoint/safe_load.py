"""Reading checkpoint files safely: any name, any supported format, no code run on load.

Formats are told apart by their bytes, not their extension (``.pth``, ``.pkl``, ``.pyth``,
anything): a torch zip file, torch's legacy (pre-1.6) file, or a plain pickle (detectron2 /
Detectron model-zoo ``.pkl``). detectron2's own ``.pkl`` branch unpickles with plain
``pickle.load``, which runs whatever code a crafted file names; here a plain pickle is read
with a restricted unpickler that rebuilds only containers, numbers, strings and numpy arrays.

torch files (``torch >= 2.6`` loads with ``weights_only=True`` by default) are loaded with
``weights_only=True``; files that need more than tensors and containers are retried, still
with ``weights_only=True``, allowing a short list of data-only classes known to occur in the
files we support (``argparse.Namespace``: the ``args`` entry of the official iTPN releases;
numpy arrays / scalars / dtypes: mmengine ``meta``). Any other class (e.g. mmengine's
``HistoryBuffer`` in a full training checkpoint) needs an explicit opt-in,
``allow_unsafe=True`` or the environment variable ``ITPN_D2_ALLOW_UNSAFE_LOAD=1``, because
unpickling arbitrary classes can run arbitrary code; the error names the file and the
classes it wants. Converting such a file once with ``tools/convert_pretrained.py`` gives a
tensors-only file.

Integrity: the zip members' CRC-32 are checked (``torch.load`` does not: a file with flipped
bytes inside a tensor loads silently), and :func:`checkpoint_dict` insists that the weights
map names to tensors / arrays. Every failure is a :class:`CheckpointFileError` naming the file.
"""
import argparse
import builtins
import codecs
import collections
import glob
import logging
import os
import pickle
import zipfile
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .errors import CheckpointFileError, CheckpointIntegrityError
from .key_report import list_keys

__all__ = [
    "ALLOW_UNSAFE_ENV",
    "checkpoint_dict",
    "extract_state_dict",
    "last_finite_checkpoint",
    "load_checkpoint_file",
    "non_finite_tensors",
]

logger = logging.getLogger(__name__)

ALLOW_UNSAFE_ENV = "ITPN_D2_ALLOW_UNSAFE_LOAD"


def non_finite_tensors(state_dict) -> List[str]:
    """Names of the floating-point tensors of ``state_dict`` that hold NaN or inf."""
    bad = []
    for k, v in state_dict.items():
        if torch.is_tensor(v) and (v.is_floating_point() or v.is_complex()) and v.numel():
            if not bool(torch.isfinite(v).all()):
                bad.append(k)
        elif isinstance(v, np.ndarray) and v.dtype.kind in "fc" and v.size and not np.isfinite(v).all():
            bad.append(k)
    return bad


def _safe_globals() -> List:
    # Data-only constructors: rebuilding them cannot execute code beyond building the value.
    items: List = [argparse.Namespace, np.ndarray, np.dtype]
    try:
        from numpy._core import multiarray as _ma  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray as _ma
    items += [_ma._reconstruct, _ma.scalar]
    items += [type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int32, np.int64, np.bool_, np.uint8)]
    return items


def _unsafe_allowed(allow_unsafe: Optional[bool]) -> bool:
    if allow_unsafe is not None:
        return bool(allow_unsafe)
    return os.environ.get(ALLOW_UNSAFE_ENV, "").strip().lower() in ("1", "true", "yes")


# torch's legacy (pre-1.6, non-zip) files start with this pickled number.
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles containers, numbers, strings and the safe-listed data classes only (the
    content of detectron2 / Detectron model-zoo ``.pkl`` files: dicts of numpy arrays)."""

    def __init__(self, f, allowed: Dict[Tuple[str, str], object]):
        super().__init__(f, encoding="latin1")
        self._allowed = allowed
        self.refused: List[str] = []

    def find_class(self, module, name):
        obj = self._allowed.get((module, name))
        if obj is None:
            self.refused.append(f"{module}.{name}")
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")
        return obj

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids (torch storages) are not allowed in a plain pickle")


def _allowed_globals() -> Dict[Tuple[str, str], object]:
    allowed = {}
    for obj in _safe_globals():
        mod, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", getattr(obj, "__name__", None))
        if mod and name:
            allowed[(mod, name)] = obj
    # numpy 1.x pickles name numpy.core.*, numpy 2.x numpy._core.*; both rebuild the same objects
    for (mod, name), obj in list(allowed.items()):
        for a, b in (("numpy._core", "numpy.core"), ("numpy.core", "numpy._core")):
            if mod.startswith(a):
                allowed[(b + mod[len(a):], name)] = obj
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    # protocol-2 pickles rebuild bytes as _codecs.encode(str, "latin1"), as torch's weights_only allows
    allowed[("_codecs", "encode")] = codecs.encode
    for name in ("set", "frozenset", "slice", "complex", "bytearray"):
        allowed[("builtins", name)] = allowed[("__builtin__", name)] = getattr(builtins, name)
    return allowed


def _check_zip_crcs(path: str) -> None:
    with zipfile.ZipFile(path) as z:
        bad = z.testzip()
    if bad is not None:
        raise CheckpointIntegrityError(
            f"checkpoint file {path} is corrupt: the CRC-32 of its member '{bad}' does not match its "
            "bytes (damaged on disk or in transfer); re-download or re-create it."
        )


def load_checkpoint_file(path: str, allow_unsafe: Optional[bool] = None):
    """Read a local checkpoint file of any name onto the CPU, safely (module docstring).

    * torch files (zip, or the pre-1.6 legacy format): the zip CRCs are checked, then
      ``torch.load(weights_only=True)``, retried with the safe-listed data classes;
    * any other pickle (detectron2 / Detectron ``.pkl``): a restricted unpickler
      (containers, numbers, strings, numpy arrays).

    Args:
        path: a local file.
        allow_unsafe: allow a full (``weights_only=False`` / ``pickle.load``) unpickling as a
            last resort; ``None`` reads ``$ITPN_D2_ALLOW_UNSAFE_LOAD``.
    Raises:
        CheckpointFileError: naming the file, when it is missing, truncated or corrupt, or
            needs classes outside the safe list and unsafe loading is off.
    """
    if not os.path.isfile(path):
        raise CheckpointFileError(f"checkpoint file not found: {path}")

    def _corrupt(e: BaseException) -> CheckpointFileError:
        if isinstance(e, CheckpointFileError):
            return e
        return CheckpointFileError(
            f"cannot read checkpoint file {path} ({os.path.getsize(path)} bytes): it looks truncated or "
            f"corrupt, or is not a checkpoint. {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        )

    def _refuse(wanted) -> CheckpointFileError:
        return CheckpointFileError(
            f"checkpoint file {path} holds Python objects that safe loading refuses: {wanted}. "
            f"Only load it fully if you trust its source: pass allow_unsafe=True (tools/convert_pretrained.py "
            f"--allow-unsafe) or set {ALLOW_UNSAFE_ENV}=1; better, convert it once with tools/convert_pretrained.py."
        )

    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as e:
        raise _corrupt(e) from e
    if is_zip:
        try:
            _check_zip_crcs(path)
        except CheckpointIntegrityError:
            raise
        except Exception as e:  # noqa: BLE001 - a broken zip directory
            raise _corrupt(e) from e
        return _torch_load_safely(path, allow_unsafe, _corrupt, _refuse)

    # Not a zip: a torch legacy file or a plain pickle. Read it with the restricted unpickler;
    # a legacy torch file starts with its magic number, and torch's own loader takes over.
    try:
        with open(path, "rb") as f:
            unpickler = _RestrictedUnpickler(f, _allowed_globals())
            try:
                first = unpickler.load()
            except pickle.UnpicklingError as e:
                if not unpickler.refused:
                    raise _corrupt(e) from e
                if not _unsafe_allowed(allow_unsafe):
                    raise _refuse(unpickler.refused) from None
                logger.warning(f"Unpickling {path} fully (unsafe load allowed); it names {unpickler.refused}.")
                f.seek(0)
                return pickle.load(f, encoding="latin1")
    except CheckpointFileError:
        raise
    except Exception as e:  # EOF, garbage
        raise _corrupt(e) from e
    if isinstance(first, int) and first == _TORCH_LEGACY_MAGIC:
        return _torch_load_safely(path, allow_unsafe, _corrupt, _refuse)
    return first


def _torch_load_safely(path, allow_unsafe, _corrupt, _refuse):
    def _load(weights_only: bool):
        return torch.load(path, map_location="cpu", weights_only=weights_only)

    try:
        return _load(True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise _corrupt(e) from e
    except Exception as e:  # zip / EOF / garbage: nothing to retry
        raise _corrupt(e) from e

    try:
        with torch.serialization.safe_globals(_safe_globals()):
            data = _load(True)
        logger.info(f"Loaded {path} with weights_only=True and the safe-listed classes (argparse.Namespace, numpy).")
        return data
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise _corrupt(e) from e
    except Exception as e:
        raise _corrupt(e) from e

    try:
        wanted = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - only used for the message
        wanted = ["<could not list>"]
    if not _unsafe_allowed(allow_unsafe):
        raise _refuse(wanted)
    logger.warning(f"Loading {path} with weights_only=False (unsafe load allowed); it holds {wanted}.")
    try:
        return _load(False)
    except Exception as e:
        raise _corrupt(e) from e


def checkpoint_dict(data, path: str) -> dict:
    """The ``{"model": state dict, ...}`` form detectron2's checkpointers use, from what
    :func:`load_checkpoint_file` read; refuses anything else with the file named.

    Recognised layouts: detectron2 / fvcore (``model``), mmengine (``state_dict``), pycls
    (``model_state``), Detectron / Caffe2 pickles (``blobs`` or a bare dict of arrays), and a
    bare state dict.
    """
    if not isinstance(data, dict):
        raise CheckpointFileError(
            f"checkpoint file {path} holds a {type(data).__name__}, not a dict of weights "
            "(expected {'model': {name: tensor}} or a state dict)"
        )
    if "model" in data and "__author__" in data:  # detectron2 model-zoo .pkl
        out = dict(data)
    elif "model" in data:
        out = data
    elif isinstance(data.get("state_dict"), dict):  # mmengine: the backbone check says what does not fit
        out = {"model": data["state_dict"]}
    elif isinstance(data.get("model_state"), dict):  # pycls
        sd = {k: v for k, v in data["model_state"].items() if not str(k).endswith("num_batches_tracked")}
        out = {"model": sd, "__author__": "pycls", "matching_heuristics": True}
    elif isinstance(data.get("blobs"), dict) or (
        data and all(isinstance(v, np.ndarray) for v in data.values())
    ):  # Detectron / Caffe2 model zoo, as detectron2's DetectionCheckpointer reads it
        blobs = data.get("blobs", data)
        sd = {k: v for k, v in blobs.items() if not str(k).endswith("_momentum")}
        out = {"model": sd, "__author__": "Caffe2", "matching_heuristics": True}
    else:
        out = {"model": data}
    model = out["model"]
    if not isinstance(model, dict):
        raise CheckpointFileError(
            f"checkpoint file {path}: its 'model' entry is a {type(model).__name__}, not a dict of weights"
        )
    bad = [str(k) for k, v in model.items() if not isinstance(k, str) or not (torch.is_tensor(v) or isinstance(v, np.ndarray))]
    if bad:
        raise CheckpointFileError(
            f"checkpoint file {path}: its weights must map names to tensors / arrays; these entries do not: "
            + list_keys(bad, 8)
        )
    return out


def extract_state_dict(obj, path: str = "<input>") -> Dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint: under ``model`` / ``state_dict`` / ``module`` (nested
    wrappers unwrapped in turn) or the dict itself; other values dropped, a ``module.`` prefix
    on every key (a DDP-wrapped model's) removed.

    Raises:
        CheckpointFileError: ``obj`` is not a dict or holds no tensors.
    """
    if not isinstance(obj, dict):
        raise CheckpointFileError(f"{path}: expected a dict, got {type(obj).__name__}")
    while True:
        inner = next((obj[k] for k in ("model", "state_dict", "module") if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointFileError(f"{path}: no tensors found (top-level keys: {sorted(obj)[:20]})")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def last_finite_checkpoint(save_dir: str, allow_unsafe: Optional[bool] = None) -> Optional[str]:
    """The newest checkpoint file in ``save_dir`` whose weights are all finite (``last_checkpoint``
    first, then ``model_*.pth`` from the newest); None if there is none."""
    candidates = []
    try:
        with open(os.path.join(save_dir, "last_checkpoint")) as f:
            candidates.append(os.path.join(save_dir, f.read().strip()))
    except OSError:
        pass
    others = sorted(glob.glob(os.path.join(save_dir, "*.pth")), key=os.path.getmtime, reverse=True)
    candidates += [c for c in others if c not in candidates]
    for c in candidates:
        try:
            data = checkpoint_dict(load_checkpoint_file(c, allow_unsafe), c)
        except CheckpointFileError:
            continue
        if not non_finite_tensors(data["model"]):
            return c
    return None
