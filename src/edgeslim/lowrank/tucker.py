"""Tucker-2 for ``nn.Conv2d`` (Kim et al. 2016, "Compression of Deep Convolutional Neural Networks
for Fast and Low Power Mobile Applications", ICLR).

The kernel ``K (Cout, Cin, kh, kw)`` is decomposed along its two channel modes only (the spatial
modes are small) by a truncated higher-order SVD (De Lathauwer et al. 2000)::

    K ≈ G ×_0 U_out ×_1 U_in,   U_out (Cout, R_out), U_in (Cin, R_in), G (R_out, R_in, kh, kw)

and the conv becomes three: 1x1 (Cin -> R_in, weights U_inᵀ), kh x kw (R_in -> R_out, weights G,
the original stride/padding/dilation), 1x1 (R_out -> Cout, weights U_out, the original bias).
Grouped and depthwise convs are not decomposed (their channel modes are block-diagonal).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgeslim.errors import ConfigError

__all__ = ["captured_energy", "factorize_conv", "hosvd2", "mode_singular_values", "tucker2_params", "unfold"]


def unfold(kernel: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding of a 4-D kernel: ``(kernel.shape[mode], product of the other dims)``."""
    return kernel.movedim(mode, 0).reshape(kernel.shape[mode], -1)


def mode_singular_values(kernel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values of the output- and input-channel unfoldings (float64), for rank selection."""
    k = kernel.detach().double()
    return torch.linalg.svdvals(unfold(k, 0)), torch.linalg.svdvals(unfold(k, 1))


def captured_energy(kernel: torch.Tensor) -> np.ndarray:
    """``E (Cout, Cin)``: ``E[a - 1, b - 1]`` is the share of ``||K||²`` kept by HOSVD ranks ``(a, b)``.

    With the full orthogonal factors, ``G = K ×_0 U_outᵀ ×_1 U_inᵀ`` has ``||G||² = ||K||²``, and
    truncating to ranks (a, b) is keeping ``G[:a, :b]`` (projection onto the leading subspaces), so
    the kept energy is a 2-D cumulative sum of ``||G[i, j]||²``: every rank pair in one SVD pass.
    """
    k = kernel.detach().double()
    u_out, _, _ = torch.linalg.svd(unfold(k, 0), full_matrices=False)  # (Cout, min(Cout, Cin*kh*kw))
    u_in, _, _ = torch.linalg.svd(unfold(k, 1), full_matrices=False)  # (Cin, min(Cin, Cout*kh*kw))
    core = torch.einsum("oihw,or,is->rshw", k, u_out, u_in)  # (r_out_max, r_in_max, kh, kw)
    total = float((k * k).sum())
    cells = (core * core).sum((2, 3)).numpy()  # (r_out_max, r_in_max)
    table = np.ones((k.shape[0], k.shape[1]))  # ranks beyond the unfolding's rank keep everything
    if total > 0.0:
        cum = cells.cumsum(0).cumsum(1) / total
        table[: cum.shape[0], : cum.shape[1]] = cum
        table[cum.shape[0]:, : cum.shape[1]] = cum[-1:, :]
        table[: cum.shape[0], cum.shape[1]:] = cum[:, -1:]
    return table


def tucker2_params(c_out: int, c_in: int, k: int, ranks: tuple[int, int], bias: bool) -> int:
    """Weights of the three convs: ``Cin R_in + R_out R_in k + R_out Cout`` (+ bias); ``k = kh * kw``."""
    r_out, r_in = ranks
    return c_in * r_in + r_out * r_in * k + r_out * c_out + (c_out if bias else 0)


def _leading(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank`` leading left singular vectors of ``matrix (n, m)``: ``(n, rank)``."""
    u, _, _ = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank]


def hosvd2(kernel: torch.Tensor, ranks: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated HOSVD on modes 0 and 1: ``(core, u_out, u_in)`` in float64.

    ``u_out (Cout, R_out)`` and ``u_in (Cin, R_in)`` are the leading left singular vectors of the
    mode-0 and mode-1 unfoldings; ``core = K ×_0 u_outᵀ ×_1 u_inᵀ`` is ``(R_out, R_in, kh, kw)``.
    At full ranks both factors are orthogonal and ``core ×_0 u_out ×_1 u_in`` is ``K`` exactly.
    """
    if kernel.dim() != 4:
        raise ConfigError(f"tucker2: expected a 4-D conv kernel, got shape {tuple(kernel.shape)}")
    c_out, c_in = kernel.shape[:2]
    r_out, r_in = ranks
    if not (1 <= r_out <= c_out and 1 <= r_in <= c_in):
        raise ConfigError(f"rank: Tucker-2 ranks (out, in) must be within (1..{c_out}, 1..{c_in}) for kernel "
                          f"{tuple(kernel.shape)}, got ({r_out}, {r_in})")
    k = kernel.detach().double()
    u_out = _leading(unfold(k, 0), r_out)  # (Cout, R_out)
    u_in = _leading(unfold(k, 1), r_in)  # (Cin, R_in)
    core = torch.einsum("oihw,or,is->rshw", k, u_out, u_in)  # (R_out, R_in, kh, kw)
    return core, u_out, u_in


def factorize_conv(conv: nn.Conv2d, ranks: tuple[int, int]) -> nn.Sequential:
    """``Conv2d(Cin, Cout, kh x kw)`` -> ``Sequential(1x1 Cin->R_in, kh x kw R_in->R_out, 1x1 R_out->Cout)``.

    A BatchNorm that followed the conv keeps following it (now after the last 1x1). The 1x1 convs
    are pointwise linear maps, so they commute with any padding mode: padding stays on the core.
    """
    if conv.groups != 1:
        raise ConfigError(f"tucker2: grouped convs (groups={conv.groups}) are not decomposed")
    core, u_out, u_in = hosvd2(conv.weight, ranks)
    r_out, r_in = ranks
    kw = {"device": conv.weight.device, "dtype": conv.weight.dtype}
    first = nn.Conv2d(conv.in_channels, r_in, 1, bias=False, **kw)
    middle = nn.Conv2d(r_in, r_out, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                       dilation=conv.dilation, bias=False, padding_mode=conv.padding_mode, **kw)
    last = nn.Conv2d(r_out, conv.out_channels, 1, bias=conv.bias is not None, **kw)
    with torch.no_grad():
        first.weight.copy_(u_in.T[:, :, None, None])  # (R_in, Cin, 1, 1)
        middle.weight.copy_(core)  # (R_out, R_in, kh, kw)
        last.weight.copy_(u_out[:, :, None, None])  # (Cout, R_out, 1, 1)
        if conv.bias is not None:
            last.bias.copy_(conv.bias)
    return nn.Sequential(first, middle, last)
