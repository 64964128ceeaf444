from .solver import build_petr_optimizer, lr_multiplier_for
from .trainer import PETRTrainer

__all__ = ["PETRTrainer", "build_petr_optimizer", "lr_multiplier_for"]
