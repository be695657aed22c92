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

Writing files: ``ITPNCheckpointer.save`` is crash-safe. The checkpoint is written to a
temporary file in the same folder, flushed and fsync'ed, then renamed over the final
name (``os.replace``, atomic on POSIX); ``last_checkpoint`` is rewritten the same way
and only after the checkpoint file is complete. A process killed at any moment leaves
the previous complete checkpoint, a ``last_checkpoint`` naming a complete file, and at
worst a stray ``.model_XXXXXXX.pth.*.tmp`` (removed by the next successful save).
"""
import argparse
import fnmatch
import logging
import os
import pickle
import tempfile
import time
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
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp creates 0600; match a plain open()
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


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


def load_checkpoint_file(path: str, allow_unsafe: Optional[bool] = None):
    """``torch.load`` a local file onto the CPU, safely (see the module docstring).

    Args:
        path: a local file.
        allow_unsafe: allow a full (``weights_only=False``) unpickling as a last
            resort; ``None`` reads ``$ITPN_D2_ALLOW_UNSAFE_LOAD``.
    Raises:
        CheckpointFileError: naming the file, when it is missing, truncated or
            corrupt, or needs classes outside the safe list and unsafe loading is off.
    """
    if not os.path.isfile(path):
        raise CheckpointFileError(f"checkpoint file not found: {path}")

    def _load(weights_only: bool):
        return torch.load(path, map_location="cpu", weights_only=weights_only)

    def _corrupt(e: BaseException) -> CheckpointFileError:
        return CheckpointFileError(
            f"cannot read checkpoint file {path} ({os.path.getsize(path)} bytes): it looks truncated or "
            f"corrupt, or is not a torch checkpoint. {type(e).__name__}: {str(e).splitlines()[0][:300]}"
        )

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
        raise CheckpointFileError(
            f"checkpoint file {path} holds Python objects that weights_only loading refuses: {wanted}. "
            f"Only load it fully if you trust its source: pass allow_unsafe=True (tools/convert_pretrained.py "
            f"--allow-unsafe) or set {ALLOW_UNSAFE_ENV}=1; better, convert it once with tools/convert_pretrained.py."
        )
    logger.warning(f"Loading {path} with weights_only=False (unsafe load allowed); it holds {wanted}.")
    try:
        return _load(False)
    except Exception as e:
        raise _corrupt(e) from e


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

    def resume_or_load(self, path: str, *, resume: bool = True):
        """``backbone_load`` applies to the initial pre-trained weights only: resuming this
        run's own checkpoint is always strict, so a fine-tuned pyramid is never dropped."""
        if resume and self.has_checkpoint():
            mode, self.backbone_load = self.backbone_load, "strict"
            new, self.new_by_design = self.new_by_design, []  # this run's own file has them
            try:
                return self.load(self.get_checkpoint_file())
            finally:
                self.backbone_load, self.new_by_design = mode, new
        return self.load(path, checkpointables=[])

    def save(self, name: str, **kwargs) -> None:
        """``fvcore.common.checkpoint.Checkpointer.save``, written atomically (module docstring)."""
        if not self.save_dir or not self.save_to_disk:
            return
        if "://" in self.save_dir:  # a remote PathManager backend: no local rename to rely on
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
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
        # Left by a process killed while writing; never a file someone else is writing now,
        # since only the main process of one run saves into its output directory.
        try:
            names = os.listdir(self.save_dir)
        except OSError:
            return
        for n in names:
            if n.startswith(".") and n.endswith(".tmp") and (".pth." in n or n.startswith(".last_checkpoint.")):
                try:
                    os.unlink(os.path.join(self.save_dir, n))
                    self.logger.info(f"Removed the incomplete checkpoint file {n} of an interrupted save")
                except OSError:
                    pass

    def _torch_load(self, f):
        self._loading_file = f
        data = load_checkpoint_file(f, allow_unsafe=self.allow_unsafe)
        if not isinstance(data, dict):
            raise CheckpointFileError(f"checkpoint file {f} holds a {type(data).__name__}, not a dict")
        if "model" not in data and isinstance(data.get("state_dict"), dict):
            # mmengine layout: the caller most likely wants tools/convert_pretrained.py, but the
            # tensors are there; the backbone check below will say what does not match.
            data = {"model": data["state_dict"]}
        return data

    def _load_model(self, checkpoint):
        if not _has_itpn_backbone(self.model):
            return super()._load_model(checkpoint)
        fname = self._loading_file or "<checkpoint>"
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
