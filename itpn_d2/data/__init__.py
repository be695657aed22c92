"""Datasets and mappers. Importing registers dataset *names* only; nothing is generated or scanned."""
from . import builtin  # noqa: F401  (registers itpn_synthetic_*)
from .builtin import default_synthetic_root, ensure_registered_synthetic, register_synthetic, synthetic_dataset_names
from .image_folder import IMAGE_EXTENSIONS, load_image_folder, register_all_unlabeled_folders, register_image_folder
from .mim_mapper import MIMDatasetMapper, RandomResizedCrop, read_rgb_image
from .synthetic import CATEGORIES, SyntheticSpec, ensure_synthetic
from .resumable import ResumableTrainingSampler, build_resumable_train_loader, set_loader_start_iter
from .safe_mapper import SafeDatasetMapper

register_all_unlabeled_folders()
