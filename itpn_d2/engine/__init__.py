from .hooks import ReconstructionVisualizer
from .trainer import (
    AutocastTrainer,
    FiniteCheckAMPTrainer,
    FiniteCheckTrainer,
    ITPNTrainer,
    NonFiniteLossError,
    build_trainer,
    check_finite_losses,
)
from .distributed import create_ddp_model, launch
