from .hooks import ReconstructionVisualizer
from .trainer import AutocastTrainer, NonFiniteLossError, check_finite_losses
