"""Rank selection from a spectrum: energy threshold, parameter budget, and analytic empirical VBMF.

All selectors work on singular values (of a Linear weight, or of one mode unfolding of a conv
kernel for Tucker-2) and return plain integers; the factorizers in :mod:`svd` and :mod:`tucker`
only ever see ranks. :func:`finish_rank` applies the user's ``round_to``/``min_rank`` and the
layer's full-rank cap the same way for every selector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from edgeslim.errors import ConfigError

__all__ = ["VBMFResult", "energy_rank", "evbmf", "finish_rank", "svd_params_rank", "tucker2_energy_ranks",
           "tucker2_params_ranks", "vbmf_rank"]


def _spectrum(s: torch.Tensor | np.ndarray) -> np.ndarray:
    """Singular values as a float64 numpy vector sorted descending (negatives are round-off)."""
    arr = s.detach().cpu().double().numpy() if isinstance(s, torch.Tensor) else np.asarray(s, dtype=np.float64)
    return np.sort(np.clip(arr.reshape(-1), 0.0, None))[::-1]


def energy_rank(s: torch.Tensor | np.ndarray, fraction: float) -> int:
    """Smallest r with ``sum(s[:r]**2) >= fraction * sum(s**2)``: the share of the squared Frobenius
    norm the rank-r truncation keeps (Eckart–Young: the rest is the truncation error)."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"energy: must be in (0, 1], got {fraction}")
    sq = _spectrum(s) ** 2
    total = sq.sum()
    if total == 0.0:
        return 1
    kept = np.cumsum(sq) / total  # (n,) non-decreasing, last = 1 up to round-off
    # a relative slack of 1e-12 keeps fraction=1.0 from asking for more than the spectrum holds
    return int(min(np.searchsorted(kept, fraction - 1e-12) + 1, len(sq)))


def svd_params_rank(n_out: int, n_in: int, fraction: float) -> int:
    """Largest r whose two factors ``r * (n_in + n_out)`` fit ``fraction`` of ``n_out * n_in`` weights."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"params_fraction: must be in (0, 1], got {fraction}")
    return max(1, math.floor(fraction * n_out * n_in / (n_out + n_in)))


def tucker2_params_ranks(c_out: int, c_in: int, k: int, fraction: float) -> tuple[int, int]:
    """Tucker-2 ranks ``(r_out, r_in)`` in proportion to ``(c_out, c_in)`` whose three kernels fit
    ``fraction`` of the ``c_out * c_in * k`` weights (``k`` = kh * kw).

    With ``r_out = a * c_out`` and ``r_in = a * c_in`` the count ``c_in r_in + k r_in r_out + r_out c_out``
    is ``b a + k c a²`` (``b = c_in² + c_out²``, ``c = c_in c_out``); setting it to ``fraction k c`` gives
    ``a = (sqrt(b² + 4 k² c² fraction) - b) / (2 k c)``. Both ranks are floored (the budget is a cap).
    """
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"params_fraction: must be in (0, 1], got {fraction}")
    b, c = c_in * c_in + c_out * c_out, c_in * c_out
    a = (math.sqrt(b * b + 4.0 * k * k * c * c * fraction) - b) / (2.0 * k * c)
    return max(1, min(c_out, math.floor(a * c_out))), max(1, min(c_in, math.floor(a * c_in)))


def tucker2_energy_ranks(captured: np.ndarray, fraction: float, k: int) -> tuple[int, int]:
    """The Tucker-2 ranks ``(r_out, r_in)`` with the fewest weights whose HOSVD keeps at least
    ``fraction`` of the kernel's squared norm; ``captured`` is :func:`tucker.captured_energy`'s table.

    This gives ``energy`` the same meaning as for SVD (share of ``||W||²`` the factors keep), rather
    than thresholding each mode on its own, which keeps less than the threshold in total.
    """
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"energy: must be in (0, 1], got {fraction}")
    c_out, c_in = captured.shape
    r_out = np.arange(1, c_out + 1)[:, None]  # (Cout, 1)
    r_in = np.arange(1, c_in + 1)[None, :]  # (1, Cin)
    cost = (c_in * r_in + k * r_out * r_in + r_out * c_out).astype(np.float64)  # (Cout, Cin)
    enough = captured >= fraction - 1e-12  # slack: the full-rank entry is 1 only up to round-off
    enough[-1, -1] = True  # full ranks reproduce the kernel exactly
    cost[~enough] = np.inf
    a, b = np.unravel_index(int(np.argmin(cost)), cost.shape)
    return int(a) + 1, int(b) + 1


def finish_rank(r: int, full: int, round_to: int = 1, min_rank: int = 1) -> int:
    """Raise ``r`` to ``min_rank``, round it up to a multiple of ``round_to``, cap it at ``full``."""
    r = max(int(r), int(min_rank), 1)
    if round_to > 1:
        r = math.ceil(r / round_to) * round_to
    return min(r, full)


# ------------------------------------------------------------------------------------------ VBMF
@dataclass(frozen=True)
class VBMFResult:
    """Analytic empirical VBMF on one matrix: the rank, the noise variance and the threshold."""

    rank: int
    sigma2: float  # estimated noise variance per entry
    threshold: float  # singular values above it are kept (gamma_EVB lower bound)


def _tau_lower(alpha: float) -> float:
    """tau_ (underline tau): the zero of ``Phi(t) + Phi(t / alpha)``, ``Phi(z) = ln(z + 1) / z - 1/2``
    (Nakajima et al. 2013, the EVB threshold; about 2.5129 sqrt(alpha)). Solved by bisection:
    the sum falls monotonically from 1 (t -> 0) to -1 (t -> inf)."""

    def f(t: float) -> float:
        return math.log1p(t) / t + math.log1p(t / alpha) / (t / alpha) - 1.0

    lo, hi = 1e-9, 1.0
    while f(hi) > 0:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) > 0 else (lo, mid)
    return 0.5 * (lo + hi)


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    """tau(x; alpha) = (x - (1 + alpha) + sqrt((x - (1 + alpha))² - 4 alpha)) / 2 (x above the threshold)."""
    b = x - (1.0 + alpha)
    return 0.5 * (b + np.sqrt(np.maximum(b * b - 4.0 * alpha, 0.0)))


def _omega(sigma2: float, sq: np.ndarray, n_long: int, alpha: float, x_lower: float) -> float:
    """The EVB free energy in sigma² up to constants and scale (Nakajima et al. 2013, noise-variance estimation):
    ``sum_h psi(x_h)``, ``x_h = gamma_h² / (M sigma²)``, ``psi = psi0 + [x > x_] psi1``,
    ``psi0(x) = x - ln x``, ``psi1(x) = ln(tau + 1) + alpha ln(tau / alpha + 1) - tau``."""
    x = sq / (n_long * sigma2)  # (L,)
    psi = x - np.log(np.maximum(x, 1e-300))
    above = x > x_lower
    if above.any():
        t = _tau(x[above], alpha)
        psi[above] += np.log1p(t) + alpha * np.log1p(t / alpha) - t
    return float(psi.sum())


def evbmf(s: torch.Tensor | np.ndarray, shape: tuple[int, int]) -> VBMFResult:
    """Analytic empirical variational Bayesian matrix factorization (Nakajima, Sugiyama, Babacan and
    Tomioka 2013, "Global analytic solution of fully-observed variational Bayesian matrix
    factorization", JMLR 14) from the singular values ``s`` of an ``shape`` matrix.

    The noise variance sigma² is the minimiser of the EVB free energy :func:`_omega` on the
    interval the paper proves contains it, ``[sigma_lo², sigma_hi²]`` with
    ``sigma_hi² = ||V||² / (L M)`` and ``sigma_lo² = max(gamma_{H+1}² / (M x_), sum_{h>H} gamma_h² / (M (L - H)))``,
    ``H = ceil(L / (1 + alpha)) - 1`` (L <= M, alpha = L / M); we search it on a log grid and refine
    with golden-section steps (the objective is not convex in general). A component is kept when
    ``gamma_h > sigma sqrt(M x_)``, ``x_ = (1 + tau_)(1 + alpha / tau_)``. This is the rank rule
    Kim et al. (2016) apply to the two mode unfoldings of a conv kernel for Tucker-2.
    """
    L, M = sorted(int(d) for d in shape)
    gam = _spectrum(s)[:L]
    if len(gam) < L:
        gam = np.concatenate([gam, np.zeros(L - len(gam))])
    sq = gam ** 2
    if sq.sum() == 0.0:
        return VBMFResult(rank=0, sigma2=0.0, threshold=0.0)
    alpha = L / M
    tau_lo = _tau_lower(alpha)
    x_lower = (1.0 + tau_lo) * (1.0 + alpha / tau_lo)
    h_max = min(math.ceil(L / (1.0 + alpha)) - 1, L - 1)
    hi = sq.sum() / (L * M)
    lo = max(sq[h_max] / (M * x_lower), sq[h_max:].sum() / (M * (L - h_max)), hi * 1e-12)
    if lo >= hi:
        sigma2 = hi
    else:
        sigma2 = _minimise_log(lambda v: _omega(v, sq, M, alpha, x_lower), lo, hi)
    threshold = math.sqrt(M * sigma2 * x_lower)
    return VBMFResult(rank=int((gam > threshold).sum()), sigma2=float(sigma2), threshold=threshold)


def _minimise_log(f, lo: float, hi: float, grid: int = 200, steps: int = 60) -> float:
    """Minimise a scalar ``f`` on ``[lo, hi]`` over log-space: grid search, then golden section
    in the bracket around the best grid point."""
    logs = np.linspace(math.log(lo), math.log(hi), grid)
    vals = [f(math.exp(v)) for v in logs]
    i = int(np.argmin(vals))
    a, b = logs[max(i - 1, 0)], logs[min(i + 1, grid - 1)]
    g = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(math.exp(c)), f(math.exp(d))
    for _ in range(steps):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(math.exp(d))
    best = min((vals[i], logs[i]), (fc, c), (fd, d))
    return math.exp(best[1])


def vbmf_rank(matrix: torch.Tensor) -> int:
    """EVBMF rank of a 2-D matrix (:func:`evbmf` on its singular values)."""
    if matrix.dim() != 2:
        raise ConfigError(f"vbmf: expected a 2-D matrix, got shape {tuple(matrix.shape)}")
    s = torch.linalg.svdvals(matrix.detach().double())
    return evbmf(s, tuple(matrix.shape)).rank
