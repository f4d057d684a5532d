"""Distillation losses: soft targets (Hinton et al. 2015) and hints (FitNets, Romero et al. 2015).

Pure functions of tensors; :func:`make_adapter` builds the small regressor FitNets puts on top of
the student's hint layer so its features can be compared with the teacher's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from edgeslim.errors import ConfigError, ModelError


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """Knowledge-distillation loss of Hinton, Vinyals & Dean, "Distilling the Knowledge in a
    Neural Network" (2015), section 2:

        L = alpha * T² * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(z_s, y)

    The KL term is averaged over the batch. Its gradient w.r.t. a student logit is
    ``(q_i - p_i) / T`` (eq. 2), i.e. it scales as 1/T² for large T (eq. 4), so multiplying by T²
    keeps the soft targets' relative contribution unchanged when T is varied.
    ``alpha`` = 1 gives pure soft-target training, 0 plain cross-entropy.
    """
    if not temperature > 0:
        raise ConfigError(f"temperature: must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha: must be in [0, 1], got {alpha}")
    if student_logits.shape != teacher_logits.shape:
        raise ModelError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ"
        )
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach() / t, dim=-1)
    soft = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)
    if alpha >= 1.0:
        return soft
    hard = F.cross_entropy(student_logits, targets)
    if alpha <= 0.0:
        return hard
    return alpha * soft + (1.0 - alpha) * hard


class _Flatten2Linear(nn.Module):
    """Flatten both sides to (N, -1) and map the student's features linearly to the teacher's."""

    def __init__(self, n_in: int, out_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.out_shape = tuple(out_shape)
        n_out = 1
        for d in out_shape:
            n_out *= d
        self.linear = nn.Linear(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1)).reshape(x.shape[0], *self.out_shape)


def make_adapter(student_shape: Sequence[int], teacher_shape: Sequence[int]) -> nn.Module:
    """The FitNets regressor r(·) (Romero et al. 2015, eq. 2) mapping student to teacher features.

    Shapes include the batch dimension, as seen by a forward hook:

    * (N, C_s, H_s, W_s) -> (N, C_t, H_t, W_t): a 1x1 convolution C_s -> C_t, followed by adaptive
      average pooling when the spatial sizes differ (FitNets' convolutional regressor);
    * (N, ..., C_s) -> (N, ..., C_t) with equal leading dims: a linear layer on the last dim;
    * anything else: flatten both and a linear map between the flattened sizes.
    """
    s, t = tuple(int(d) for d in student_shape), tuple(int(d) for d in teacher_shape)
    if len(s) < 2 or len(t) < 2:
        raise ModelError(f"hint features need a batch and a feature dimension, got student {s} and teacher {t}")
    if len(s) == 4 and len(t) == 4:
        layers: list[nn.Module] = [nn.Conv2d(s[1], t[1], kernel_size=1)]
        if s[2:] != t[2:]:
            layers.append(nn.AdaptiveAvgPool2d(t[2:]))
        return nn.Sequential(*layers)
    if len(s) == len(t) and s[1:-1] == t[1:-1]:
        return nn.Linear(s[-1], t[-1])
    n_in = 1
    for d in s[1:]:
        n_in *= d
    return _Flatten2Linear(n_in, t[1:])


def hint_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, adapter: nn.Module) -> torch.Tensor:
    """FitNets hint loss (Romero et al. 2015, eq. 2): ½‖u_h(x) − r(v_g(x))‖², here as the mean
    squared error between the teacher's hint features u_h and the adapted student features r(v_g).

    The teacher side is detached: only the student and the adapter learn from it.
    """
    mapped = adapter(student_feat)
    if mapped.shape != teacher_feat.shape:
        raise ModelError(
            f"hint adapter maps student features {tuple(student_feat.shape)} to {tuple(mapped.shape)}, "
            f"but the teacher features are {tuple(teacher_feat.shape)}"
        )
    return F.mse_loss(mapped, teacher_feat.detach())
