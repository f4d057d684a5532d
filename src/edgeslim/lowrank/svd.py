"""Truncated SVD for ``nn.Linear`` (and ungrouped ``nn.Conv2d``): one wide layer becomes two thin ones.

``W (out, in) ≈ U_r S_r V_rᵀ`` is the best rank-r approximation in Frobenius norm (Eckart–Young),
so ``||W - W_r||_F² = sum_{i > r} s_i²``. It pays off only when ``r (in + out) < in * out``.
"""

from __future__ import annotations

import torch
from torch import nn

from edgeslim.errors import ConfigError

__all__ = ["factorize_conv_svd", "factorize_linear", "svd_factors", "svd_params"]


def svd_params(n_out: int, n_in: int, rank: int, bias: bool) -> int:
    """Weights of the factorized pair: ``rank * (n_in + n_out)`` plus the bias."""
    return rank * (n_in + n_out) + (n_out if bias else 0)


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first, second)`` with ``second @ first`` the rank-``rank`` truncation of ``weight (out, in)``.

    ``first = sqrt(S_r) V_rᵀ`` is ``(rank, in)``, ``second = U_r sqrt(S_r)`` is ``(out, rank)``.
    Splitting ``S`` evenly (rather than folding it into one side) gives both factors the same
    scale: neither layer's weights or gradients dwarf the other's during fine-tuning, and both
    keep similar value ranges if they are quantized later. Computed in float64, returned in the
    weight's dtype.
    """
    if weight.dim() != 2:
        raise ConfigError(f"svd: expected a 2-D weight, got shape {tuple(weight.shape)}")
    full = min(weight.shape)
    if not 1 <= rank <= full:
        raise ConfigError(f"rank: must be in [1, {full}] for a weight of shape {tuple(weight.shape)}, got {rank}")
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)  # (out, k), (k,), (k, in)
    root = s[:rank].sqrt()
    first = root[:, None] * vh[:rank]  # (rank, in)
    second = u[:, :rank] * root[None, :]  # (out, rank)
    return first.to(weight.dtype), second.to(weight.dtype)


def factorize_linear(layer: nn.Linear, rank: int) -> nn.Sequential:
    """``Linear(in, out)`` -> ``Sequential(Linear(in, rank, bias=False), Linear(rank, out, bias=orig))``."""
    first_w, second_w = svd_factors(layer.weight, rank)
    has_bias = layer.bias is not None
    kw = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    first = nn.Linear(layer.in_features, rank, bias=False, **kw)
    second = nn.Linear(rank, layer.out_features, bias=has_bias, **kw)
    with torch.no_grad():
        first.weight.copy_(first_w)
        second.weight.copy_(second_w)
        if has_bias:
            second.bias.copy_(layer.bias)
    return nn.Sequential(first, second)


def factorize_conv_svd(conv: nn.Conv2d, rank: int) -> nn.Sequential:
    """SVD of an ungrouped conv's kernel viewed as ``(Cout, Cin * kh * kw)``: a kh x kw conv
    ``Cin -> rank`` (original stride/padding/dilation) then a 1x1 conv ``rank -> Cout`` (original bias).

    For a 1x1 conv this is the Linear case over channels; Tucker-2 would add a useless 1x1 core.
    """
    if conv.groups != 1:
        raise ConfigError(f"svd: grouped convs (groups={conv.groups}) are not decomposed")
    c_out, c_in = conv.out_channels, conv.in_channels
    first_w, second_w = svd_factors(conv.weight.reshape(c_out, -1), rank)  # (rank, Cin*kh*kw), (Cout, rank)
    kw = {"device": conv.weight.device, "dtype": conv.weight.dtype}
    # The first conv owns the spatial work (and the border): with zero padding and no bias it maps
    # a zero border to zero, so the 1x1 after it sees exactly the original conv's pre-bias output.
    first = nn.Conv2d(c_in, rank, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                      dilation=conv.dilation, bias=False, padding_mode=conv.padding_mode, **kw)
    second = nn.Conv2d(rank, c_out, 1, bias=conv.bias is not None, **kw)
    with torch.no_grad():
        first.weight.copy_(first_w.reshape(rank, c_in, *conv.kernel_size))  # (rank, Cin, kh, kw)
        second.weight.copy_(second_w[:, :, None, None])  # (Cout, rank, 1, 1)
        if conv.bias is not None:
            second.bias.copy_(conv.bias)
    return nn.Sequential(first, second)
