"""Checkpoint loading for iTPN models: exact names, loud failures.

``ITPNCheckpointer`` is a ``DetectionCheckpointer`` that, when the model holds an
:class:`~itpn_d2.modeling.ITPNBackbone` as ``model.backbone``, checks every
``backbone.*`` tensor of the checkpoint against the model *before* loading:

* ``backbone_load="strict"`` (default): every ``backbone.net.*`` and
  ``backbone.pyramid.*`` tensor of the model must be in the checkpoint with the
  same shape, and the checkpoint may hold no ``backbone.*`` tensor the model
  lacks (a deeper pyramid, more blocks, another size). Otherwise a
  :class:`BackboneLoadError` lists the missing / mismatched / unexpected keys
  with both shapes and names the file.
* ``backbone_load="encoder_only"``: the same check for ``backbone.net.*``
  only; the checkpoint's ``backbone.pyramid.*`` tensors are *not* loaded, so the
  pyramid keeps its random init (the "pre-trained encoder, fresh pyramid"
  ablation).
* ``backbone_load="partial"``: load whatever matches by exact name and shape and
  log the rest; for deliberate experiments only.
* ``new_by_design`` (``train.new_by_design_keys``): ``fnmatch`` patterns of backbone tensors a
  config adds on purpose on top of the pre-trained model (the ADE20K configs' zero-initialised
  relative position bias tables). A key matching them may be absent from the checkpoint: it is
  listed in the log as "new by design, zero-initialised" and keeps the model's init. Any other
  missing key is refused as before; a shape mismatch is refused even for these keys.

Keys outside ``backbone.*`` that the model does not have (pre-training decoder,
mask token, teacher, prediction heads) are logged as dropped, never an error;
heads of the model that the checkpoint lacks (RPN, ROI heads) keep their init, as
in any detectron2 fine-tuning. detectron2's ``matching_heuristics`` (suffix
matching that can put a generic ``norm.weight`` in the wrong place) is never
applied to a model with an ITPNBackbone: names are matched exactly.

Reading files (``torch >= 2.6`` loads with ``weights_only=True`` by default):
:func:`load_checkpoint_file` first loads with ``weights_only=True``. Files that
need more than tensors and containers are retried, still with
``weights_only=True``, allowing a short list of data-only classes known to occur
in the files we support (``argparse.Namespace``: the ``args`` entry of the
official iTPN releases; numpy arrays / scalars / dtypes: mmengine ``meta``). Any
other class (e.g. mmengine's ``HistoryBuffer`` in a full training checkpoint)
needs an explicit opt-in, ``allow_unsafe=True`` or the environment variable
``ITPN_D2_ALLOW_UNSAFE_LOAD=1``, because unpickling arbitrary classes can run
arbitrary code; the error names the file and the classes it wants. Converting
such a file once with ``tools/convert_pretrained.py`` gives a tensors-only file.

Every file name goes through :func:`load_checkpoint_file`, whatever its extension
(``.pth``, ``.pkl``, ``.pyth``, anything): detectron2's own ``.pkl`` branch unpickles with
plain ``pickle.load``, which runs whatever code a crafted file names. A file that is not a
torch zip / legacy file (detectron2 / Detectron model-zoo ``.pkl``) is read with a
restricted unpickler that rebuilds only containers, numbers, strings and numpy arrays.

Integrity on load: the zip members' CRC-32 are checked (``torch.load`` does not: a file
with flipped bytes inside a tensor loads silently); the ``model`` entry must map names to
tensors / arrays; a tensor that the model holds as floating point must be floating point
in the file (an int64 copy would be cast silently); and NaN / inf weights are refused with
their names (:class:`CheckpointIntegrityError`).

Writing files: ``ITPNCheckpointer.save`` is crash-safe. The checkpoint is written to a
temporary file in the same folder, flushed and fsync'ed, then renamed over the final
name (``os.replace``, atomic on POSIX); ``last_checkpoint`` is rewritten the same way
and only after the checkpoint file is complete. A process killed at any moment leaves
the previous complete checkpoint, a ``last_checkpoint`` naming a complete file, and at
worst a stray ``.model_XXXXXXX.pth.<host>-<pid>.*.tmp``. Temporary names carry the
writer's host and process id, and a save removes only its own temporaries and those of dead
processes of the same host (never a live writer's). A model whose weights are not all
finite is never saved (:class:`NonFiniteWeightsError`), so ``last_checkpoint`` always names
finite weights; a failed write says why in one line (e.g. no space left on the device).
"""
import argparse
import builtins
import codecs
import collections
import errno
import fnmatch
import glob
import logging
import os
import pickle
import re
import socket
import tempfile
import time
import zipfile
from collections import defaultdict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch.nn.parallel import DataParallel, DistributedDataParallel

__all__ = [
    "ITPNCheckpointer",
    "BackboneLoadError",
    "CheckpointFileError",
    "CheckpointIntegrityError",
    "CheckpointWriteError",
    "NonFiniteWeightsError",
    "last_finite_checkpoint",
    "load_checkpoint_file",
    "load_pretrained",
    "compare_state_dicts",
    "BACKBONE_LOAD_MODES",
    "ALLOW_UNSAFE_ENV",
    "atomic_write",
]

logger = logging.getLogger(__name__)

BACKBONE_LOAD_MODES = ("strict", "encoder_only", "partial")
ALLOW_UNSAFE_ENV = "ITPN_D2_ALLOW_UNSAFE_LOAD"
ENCODER_PREFIX = "backbone.net."
PYRAMID_PREFIX = "backbone.pyramid."


class CheckpointFileError(RuntimeError):
    """A checkpoint file could not be read (missing, truncated, corrupt, or needs an unsafe load)."""


class BackboneLoadError(RuntimeError):
    """The checkpoint's backbone tensors do not match the model's."""


class CheckpointIntegrityError(CheckpointFileError):
    """A readable checkpoint whose content cannot be right (corrupt bytes, wrong dtypes, NaN / inf)."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (e.g. no space left on the device); the message says why."""


class NonFiniteWeightsError(FloatingPointError):
    """The model's weights hold NaN / inf: not saved, so that no checkpoint of them exists."""


def _list_keys(keys: Sequence[str], n: int = 20) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > n else f" ({len(keys)})")


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


# Test-only: "NAME:MARKER" makes the save of checkpoint NAME (e.g. model_0000007) stop half-way
# through writing its temporary file, create the file MARKER and sleep, so that a test can
# kill the process in the middle of a checkpoint write deterministically.
PAUSE_WRITE_ENV = "ITPN_D2_TEST_PAUSE_CHECKPOINT_WRITE"


def _fsync_dir(path: str) -> None:
    # Makes the rename itself durable (POSIX); not possible / needed everywhere.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, write_fn, *, binary: bool = True) -> None:
    """Write ``path`` so that it is either absent / its old version or the complete new one.

    ``write_fn(f)`` writes into a temporary file in the same folder, which is flushed,
    fsync'ed and renamed over ``path``; the folder is fsync'ed after the rename. On any
    error the temporary file is removed and the error re-raised; ``path`` is untouched.
    """
    folder = os.path.dirname(os.path.abspath(path))
    prefix = "." + os.path.basename(path) + "." + _writer_id() + "."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
    recorder = _WriteErrorRecorder()
    try:
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp creates 0600; match a plain open()
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write_fn(recorder.wrap(f))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        cause = recorder.error or _os_error_in_chain(e)
        if cause is not None:
            raise CheckpointWriteError(_write_error_message(path, folder, cause)) from e
        raise
    _fsync_dir(folder)


def _writer_id() -> str:
    """``<host>-<pid>``: who writes a temporary file (dots and dashes of the host kept readable)."""
    host = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}"


_TEMP_RE = re.compile(r"^\.(?P<target>.+?)\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.[^.]*\.tmp$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def temporary_owner(name: str) -> Optional[Tuple[str, int]]:
    """(host, pid) of the writer of a temporary file made by :func:`atomic_write`; None if the
    name is not one (e.g. an older unnamed temporary)."""
    m = _TEMP_RE.match(name)
    return (m.group("host"), int(m.group("pid"))) if m else None


class _WriteErrorRecorder:
    """Keeps the ``OSError`` a file write raised: torch's writer turns it into a
    ``RuntimeError: [enforce fail at inline_container.cc] ... file write failed`` that hides
    the cause (ENOSPC, EDQUOT, EIO)."""

    def __init__(self):
        self.error: Optional[OSError] = None

    def wrap(self, f):
        recorder = self

        class _File:
            def __getattr__(self, name):
                return getattr(f, name)

            def write(self, b):
                try:
                    return f.write(b)
                except OSError as e:
                    recorder.error = e
                    raise

        return _File()


def _os_error_in_chain(e: BaseException) -> Optional[OSError]:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        e = e.__cause__ or e.__context__
    return None


def _write_error_message(path: str, folder: str, cause: OSError) -> str:
    what = os.strerror(cause.errno) if cause.errno else str(cause)
    try:
        st = os.statvfs(folder)
        free = f"; {st.f_bavail * st.f_frsize / 2**20:.1f} MiB free there now"
    except OSError:
        free = ""
    hint = " Free some space or point train.output_dir at a larger disk." if cause.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return f"cannot write checkpoint {path}: {what} (errno {cause.errno}){free}; the previous checkpoint is untouched.{hint}"


class _PausingWriter:
    """File wrapper for the test hook ``PAUSE_WRITE_ENV``: after ``after_bytes`` bytes it
    flushes, creates ``marker`` and sleeps until killed."""

    def __init__(self, f, marker: str, after_bytes: int = 4096):
        self.f, self.marker, self.after_bytes, self.n = f, marker, after_bytes, 0

    def write(self, b):
        r = self.f.write(b)
        self.n += len(b)
        if self.n >= self.after_bytes:
            self.f.flush()
            os.fsync(self.f.fileno())
            with open(self.marker, "w") as m:
                m.write(str(os.getpid()))
            while True:
                time.sleep(1)
        return r

    def flush(self):
        self.f.flush()


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
            + _list_keys(bad, 8)
        )
    return out


def check_weights_fit(model_sd: Dict[str, torch.Tensor], sd: Dict[str, torch.Tensor], path: str) -> None:
    """Refuse weights the model would load silently wrong: a tensor the model holds as floating
    point stored as integers (``load_state_dict`` casts it), or NaN / inf values."""
    wrong_dtype = [
        f"{k} ({v.dtype} in the file, {model_sd[k].dtype} in the model)"
        for k, v in sd.items()
        if torch.is_tensor(v) and k in model_sd and model_sd[k].is_floating_point() and not v.is_floating_point()
    ]
    if wrong_dtype:
        raise CheckpointIntegrityError(
            f"checkpoint file {path} holds non-floating-point values where the model has floating-point "
            f"weights: {_list_keys(wrong_dtype, 8)}. It is corrupt or was converted wrongly."
        )
    bad = non_finite_tensors({k: v for k, v in sd.items() if k in model_sd})
    if bad:
        raise CheckpointIntegrityError(
            f"checkpoint file {path} holds NaN / inf values in {_list_keys(bad)}; refusing to load them. "
            "If it was saved after a divergence, use the checkpoint before it."
        )


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


def _group_by_prefix(keys: Iterable[str], depth: int = 2) -> Dict[str, int]:
    groups: Dict[str, int] = defaultdict(int)
    for k in keys:
        groups[".".join(k.split(".")[:depth])] += 1
    return dict(sorted(groups.items()))


def _unwrap(model):
    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


def _strip_module(sd):
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _has_itpn_backbone(model) -> bool:
    from .modeling.backbone import ITPNBackbone

    return isinstance(getattr(_unwrap(model), "backbone", None), ITPNBackbone)


class ITPNCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with safe file reading and exact, checked backbone loading.

    Args:
        model, save_dir, save_to_disk, checkpointables: as ``DetectionCheckpointer``.
        backbone_load: ``"strict"`` | ``"encoder_only"`` | ``"partial"`` (module docstring).
        allow_unsafe: see :func:`load_checkpoint_file`.

    After :meth:`load`, ``self.last_load_report`` holds the counts (encoder,
    pyramid, other tensors loaded; backbone tensors left at init; dropped keys).
    """

    def __init__(
        self,
        model,
        save_dir: str = "",
        *,
        backbone_load: str = "strict",
        allow_unsafe: Optional[bool] = None,
        new_by_design: Sequence[str] = (),
        save_to_disk=None,
        **checkpointables,
    ):
        if backbone_load not in BACKBONE_LOAD_MODES:
            raise ValueError(f"backbone_load={backbone_load!r}; choose one of {BACKBONE_LOAD_MODES}")
        if isinstance(new_by_design, str):
            new_by_design = [new_by_design]
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.backbone_load = backbone_load
        self.new_by_design = list(new_by_design or ())
        self.allow_unsafe = allow_unsafe
        self.last_load_report: Optional[dict] = None
        self._loading_file: Optional[str] = None

    def load(self, path: str, *args, **kwargs):
        """detectron2's ``load``, with a missing file as a :class:`CheckpointFileError` naming it
        (fvcore asserts, DDP runs raise ``OSError``)."""
        if path and "://" not in path and not os.path.isfile(path):
            raise CheckpointFileError(f"checkpoint file not found: {path}")
        return super().load(path, *args, **kwargs)

    def resume_or_load(self, path: str, *, resume: bool = True):
        """``backbone_load`` applies to the initial pre-trained weights only: resuming this
        run's own checkpoint is always strict, so a fine-tuned pyramid is never dropped."""
        if resume and self.has_checkpoint():
            last = self.get_checkpoint_file()
            if "://" not in last and not os.path.isfile(last):
                present = sorted(os.path.basename(f) for f in glob.glob(os.path.join(self.save_dir, "*.pth")))
                raise CheckpointFileError(
                    f"--resume: {os.path.join(self.save_dir, 'last_checkpoint')} names {last}, which does not "
                    f"exist (checkpoints in that folder: {present or 'none'}). Write the name of the one to resume "
                    "from into last_checkpoint, or delete last_checkpoint to start from train.init_checkpoint."
                )
            mode, self.backbone_load = self.backbone_load, "strict"
            new, self.new_by_design = self.new_by_design, []  # this run's own file has them
            try:
                return self.load(last)
            finally:
                self.backbone_load, self.new_by_design = mode, new
        return self.load(path, checkpointables=[])

    def save(self, name: str, **kwargs) -> None:
        """``fvcore.common.checkpoint.Checkpointer.save``, written atomically (module docstring).

        Raises:
            NonFiniteWeightsError: the model holds NaN / inf weights (nothing is written).
            CheckpointWriteError: the file could not be written (e.g. disk full).
        """
        if not self.save_dir or not self.save_to_disk:
            return
        model_sd = self.model.state_dict()
        bad = non_finite_tensors(model_sd)
        if bad:
            last = self.get_checkpoint_file() if self.has_checkpoint() else ""
            raise NonFiniteWeightsError(
                f"the model's weights hold NaN / inf ({_list_keys(bad, 6)}); not saving {name}.pth, so that "
                f"no checkpoint of them exists. Last checkpoint with finite weights: {last or 'none'}."
            )
        if "://" in self.save_dir:  # a remote PathManager backend: no local rename to rely on
            return super().save(name, **kwargs)
        data = {"model": model_sd}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        os.makedirs(self.save_dir, exist_ok=True)
        pause = os.environ.get(PAUSE_WRITE_ENV, "")
        if pause.split(":", 1)[0] == name:
            marker = pause.split(":", 1)[1]
            atomic_write(save_file, lambda f: torch.save(data, _PausingWriter(f, marker)))
        else:
            atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)
        self._remove_stale_temporaries()

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Point ``last_checkpoint`` at ``last_filename_basename``, atomically."""
        if "://" in self.save_dir:
            return super().tag_last_checkpoint(last_filename_basename)
        atomic_write(
            os.path.join(self.save_dir, "last_checkpoint"), lambda f: f.write(last_filename_basename), binary=False
        )

    def _remove_stale_temporaries(self) -> None:
        """Remove the temporaries of interrupted saves: this process's own, and those of dead
        processes of this host. A live writer's (another run, another host) are left alone."""
        try:
            names = os.listdir(self.save_dir)
        except OSError:
            return
        me = _writer_id()
        host = me.rsplit("-", 1)[0]
        for n in names:
            if not (n.startswith(".") and n.endswith(".tmp") and (".pth." in n or n.startswith(".last_checkpoint."))):
                continue
            owner = temporary_owner(n)
            if owner is None:
                continue  # not named by atomic_write: someone else's
            if f"{owner[0]}-{owner[1]}" != me and (owner[0] != host or _pid_alive(owner[1])):
                continue
            try:
                os.unlink(os.path.join(self.save_dir, n))
                self.logger.info(f"Removed the incomplete checkpoint file {n} of an interrupted save")
            except OSError:
                pass

    def _load_file(self, filename):
        """Every file name, ``.pkl`` and ``.pyth`` included, through :func:`load_checkpoint_file`
        (detectron2's own ``.pkl`` branch is a plain ``pickle.load``)."""
        self._loading_file = filename
        data = checkpoint_dict(load_checkpoint_file(filename, allow_unsafe=self.allow_unsafe), filename)
        parsed_url = getattr(self, "_parsed_url_during_load", None)
        if parsed_url is not None and parsed_url.query:
            from urllib.parse import parse_qs

            queries = parse_qs(parsed_url.query)
            if queries.pop("matching_heuristics", "False") == ["True"]:
                data["matching_heuristics"] = True
            if queries:
                raise CheckpointFileError(f"unsupported query {queries} in the checkpoint name {parsed_url.geturl()}")
        return data

    def _load_model(self, checkpoint):
        fname = self._loading_file or "<checkpoint>"
        if not _has_itpn_backbone(self.model):
            self._convert_ndarray_to_tensor(checkpoint["model"])
            check_weights_fit(self.model.state_dict(), _strip_module(checkpoint["model"]), fname)
            return super()._load_model(checkpoint)
        if checkpoint.get("matching_heuristics", False):
            self.logger.warning(
                f"{fname}: ignoring matching_heuristics=True; iTPN backbones load by exact key names only."
            )
        checkpoint["matching_heuristics"] = False
        sd = checkpoint["model"]
        self._convert_ndarray_to_tensor(sd)
        if sd and all(k.startswith("module.") for k in sd):
            sd = {k[len("module.") :]: v for k, v in sd.items()}
        if not any(k.startswith("backbone.") for k in sd) and any(k.startswith(("net.", "pyramid.")) for k in sd):
            # A bare ITPNBackbone state dict (net.*, pyramid.*): same names one level down.
            self.logger.info(f"{fname}: bare backbone state dict; prefixing its keys with 'backbone.'")
            sd = {("backbone." + k if k.startswith(("net.", "pyramid.")) else k): v for k, v in sd.items()}

        model_sd = self.model.state_dict()
        check_weights_fit(model_sd, sd, fname)
        mode = self.backbone_load
        checked = (ENCODER_PREFIX, PYRAMID_PREFIX) if mode == "strict" else (ENCODER_PREFIX,)
        missing, mismatched, unexpected = compare_state_dicts(model_sd, sd, checked)
        new_by_design = [k for k in missing if any(fnmatch.fnmatchcase(k, p) for p in self.new_by_design)]
        if new_by_design:
            excused = set(new_by_design)
            missing = [k for k in missing if k not in excused]
        if mode != "partial" and (missing or mismatched or unexpected):
            n_model = sum(1 for k in model_sd if k.startswith(checked))
            raise BackboneLoadError(
                f"checkpoint {fname} does not fit this model's backbone (backbone_load={mode!r}, checked "
                f"{'/'.join(p.rstrip('.') for p in checked)}: {n_model} tensors in the model):\n"
                + format_key_report(missing, mismatched, unexpected)
                + "\nIs it a checkpoint of another size / block layout / pyramid depth? Official iTPN and "
                "mmpretrain files must first go through tools/convert_pretrained.py. To load only what "
                "matches on purpose, use backbone_load='encoder_only' or 'partial'."
            )

        skipped_pyramid = []
        if mode == "encoder_only":
            skipped_pyramid = [k for k in sd if k.startswith(PYRAMID_PREFIX)]
            for k in skipped_pyramid:
                del sd[k]
            if skipped_pyramid:
                self.logger.info(
                    f"backbone_load='encoder_only': not loading {len(skipped_pyramid)} pyramid tensors of {fname}; "
                    "the pyramid keeps its initialisation."
                )
        if mode == "partial":
            bad = {k for k, _, _ in mismatched}
            for k in bad:
                del sd[k]
            if missing or mismatched or unexpected:
                self.logger.warning(
                    f"backbone_load='partial': {fname} does not fully fit the backbone:\n"
                    + format_key_report(missing, mismatched, unexpected)
                )

        checkpoint["model"] = sd
        incompatible = super()._load_model(checkpoint)

        loaded = [k for k in sd if k in model_sd and _shape(sd[k]) == _shape(model_sd[k])]
        n_enc = sum(k.startswith(ENCODER_PREFIX) for k in loaded)
        n_pyr = sum(k.startswith(PYRAMID_PREFIX) for k in loaded)
        backbone_keys = [k for k in model_sd if k.startswith((ENCODER_PREFIX, PYRAMID_PREFIX))]
        loaded_set = set(loaded)
        new_set = set(new_by_design)
        reinit = [k for k in backbone_keys if k not in loaded_set and k not in new_set]
        dropped = [k for k in incompatible.unexpected_keys if not k.startswith("backbone.")]
        # Reported here, grouped; keep fvcore's generic "unexpected keys" message for the rest.
        for k in dropped:
            incompatible.unexpected_keys.remove(k)
        for k in new_set & set(incompatible.missing_keys):  # reported below, not as a warning
            incompatible.missing_keys.remove(k)
        self.last_load_report = {
            "file": fname,
            "mode": mode,
            "encoder": n_enc,
            "pyramid": n_pyr,
            "other": len(loaded) - n_enc - n_pyr,
            "reinitialised": reinit,
            "new_by_design": new_by_design,
            "dropped": dropped,
        }
        self.logger.info(
            f"Loaded {fname}: {n_enc} encoder tensors, {n_pyr} pyramid tensors, "
            f"{len(loaded) - n_enc - n_pyr} other tensors; {len(reinit)} backbone tensors re-initialised."
        )
        if new_by_design:
            self.logger.info(
                f"{len(new_by_design)} backbone tensors not in {fname} are new by design, zero-initialised "
                f"(train.new_by_design_keys {self.new_by_design}): "
                + ", ".join(f"{p} ({n})" for p, n in _group_by_prefix(new_by_design, depth=4).items())
            )
        if dropped:
            self.logger.info(
                f"Dropped {len(dropped)} checkpoint tensors this model does not use (pre-training only): "
                + ", ".join(f"{p} ({n})" for p, n in _group_by_prefix(dropped).items())
            )
        return incompatible


def load_pretrained(
    model: torch.nn.Module,
    path: str,
    mode: str = "strict",
    allow_unsafe: Optional[bool] = None,
    new_by_design: Sequence[str] = (),
) -> dict:
    """Load ``path`` into ``model`` with :class:`ITPNCheckpointer` (no optimizer / scheduler state).

    Meant for ``tools/lazyconfig_train_net.py``:
    ``load_pretrained(model, cfg.train.init_checkpoint, cfg.train.get("backbone_load", "strict"))``.

    Returns:
        the load report (see ``ITPNCheckpointer.last_load_report``); for a model
        without an ITPNBackbone, ``{"file": path, "mode": mode}``.
    """
    ckpt = ITPNCheckpointer(model, backbone_load=mode, allow_unsafe=allow_unsafe, new_by_design=new_by_design)
    ckpt.load(path, checkpointables=[])
    return ckpt.last_load_report or {"file": path, "mode": mode}
