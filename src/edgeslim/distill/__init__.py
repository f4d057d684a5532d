"""Knowledge distillation: soft targets (Hinton et al. 2015) and hints (FitNets, Romero et al. 2015).

Technique (registered by name): distill (a KD fine-tune of the model entering the step).
"""

from edgeslim.distill.losses import hint_loss, kd_loss, make_adapter
from edgeslim.distill.technique import DistillConfig, distill_step
from edgeslim.distill.trainer import distill

__all__ = ["DistillConfig", "distill", "distill_step", "hint_loss", "kd_loss", "make_adapter"]
