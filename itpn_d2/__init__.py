"""iTPN (Integrally Pre-Trained Transformer Pyramid Networks) for detectron2.

Importing the package registers its backbone, meta-architectures and datasets
with detectron2's registries.
"""
from . import modeling  # noqa: F401  (registers ITPNBackbone, meta-architectures)
from . import data  # noqa: F401  (registers the built-in datasets)
from . import evaluation  # noqa: F401
from . import schedule  # noqa: F401  (registers the itpn.* config resolvers: schedules from the batch)

__version__ = "0.1.0"
