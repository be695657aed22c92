"""``ITPNCheckpointer``: detectron2's checkpointer with exact, checked backbone loading.

``tools/lazyconfig_train_net.py`` loads ``train.init_checkpoint`` with
``ITPNCheckpointer(model, output_dir, backbone_load=train.backbone_load,
new_by_design=train.new_by_design_keys).resume_or_load(path, resume=args.resume)`` and saves
the run's checkpoints with the same object.

When the model holds an :class:`~itpn_d2.modeling.ITPNBackbone` as ``model.backbone``, every
``backbone.*`` tensor of the checkpoint is checked against the model *before* loading:

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

``backbone_load`` applies to the initial pre-trained weights only: resuming the run's own
checkpoint (``--resume``) is always strict.

Keys outside ``backbone.*`` that the model does not have (pre-training decoder,
mask token, teacher, prediction heads) are logged as dropped, never an error;
heads of the model that the checkpoint lacks (RPN, ROI heads) keep their init, as
in any detectron2 fine-tuning. detectron2's ``matching_heuristics`` (suffix
matching that can put a generic ``norm.weight`` in the wrong place) is never
applied to a model with an ITPNBackbone: names are matched exactly.

Every file is read by :func:`~itpn_d2.checkpoint.safe_load.load_checkpoint_file`, whatever its
name. Integrity on load, beyond what the reader checks: a tensor that the model holds as
floating point must be floating point in the file (an int64 copy would be cast silently), and
NaN / inf weights are refused with their names (:class:`CheckpointIntegrityError`).

Saving is crash-safe (:func:`~itpn_d2.checkpoint.atomic_save.atomic_write`): the checkpoint
file, then ``last_checkpoint``, each written atomically, so a process killed at any moment
leaves the previous complete checkpoint, a ``last_checkpoint`` naming a complete file, and at
worst a stray ``.model_XXXXXXX.pth.<host>-<pid>.*.tmp``, which a later save removes once its
writer is dead. A model whose weights are not all finite is never saved
(:class:`NonFiniteWeightsError`), so ``last_checkpoint`` always names finite weights.
"""
import fnmatch
import glob
import os
from collections import defaultdict
from typing import Dict, Iterable, Optional, Sequence

import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch.nn.parallel import DataParallel, DistributedDataParallel

from .atomic_save import atomic_write, stale_temporaries
from .errors import BackboneLoadError, CheckpointFileError, CheckpointIntegrityError, NonFiniteWeightsError
from .key_report import compare_state_dicts, format_key_report, list_keys
from .safe_load import checkpoint_dict, load_checkpoint_file, non_finite_tensors

__all__ = ["ITPNCheckpointer", "BACKBONE_LOAD_MODES", "check_weights_fit"]

BACKBONE_LOAD_MODES = ("strict", "encoder_only", "partial")
ENCODER_PREFIX = "backbone.net."
PYRAMID_PREFIX = "backbone.pyramid."


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
            f"weights: {list_keys(wrong_dtype, 8)}. It is corrupt or was converted wrongly."
        )
    bad = non_finite_tensors({k: v for k, v in sd.items() if k in model_sd})
    if bad:
        raise CheckpointIntegrityError(
            f"checkpoint file {path} holds NaN / inf values in {list_keys(bad)}; refusing to load them. "
            "If it was saved after a divergence, use the checkpoint before it."
        )


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
    from ..modeling.backbone import ITPNBackbone

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
                f"the model's weights hold NaN / inf ({list_keys(bad, 6)}); not saving {name}.pth, so that "
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
        """Remove the temporaries of interrupted saves of checkpoints and ``last_checkpoint``:
        this process's own, and those of dead processes of this host (``stale_temporaries``)."""
        for n in stale_temporaries(self.save_dir):
            if ".pth." not in n and not n.startswith(".last_checkpoint."):
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

        loaded = [k for k in sd if k in model_sd and tuple(sd[k].shape) == tuple(model_sd[k].shape)]
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
                f"Dropped {len(dropped)} checkpoint tensors this model does not have (outside its backbone: "
                "pre-training decoders and teacher, or another task's heads): "
                + ", ".join(f"{p} ({n})" for p, n in _group_by_prefix(dropped).items())
            )
        return incompatible

