"""Fake quantization for quantization-aware training, bit-compatible with ONNX Runtime's QDQ ops.

ORT's QuantizeLinear computes ``q = clamp(round_half_to_even(x / s) + zp, qmin, qmax)`` in
float32 and DequantizeLinear ``x_hat = (q - zp) * s``; ``torch.round`` also rounds half to even,
so the forward pass below reproduces those values exactly. Gradients use the straight-through
estimator (Bengio et al. 2013): ``round`` passes gradients unchanged, ``clamp`` zeroes them
outside the grid. With a learnable step size the same expression yields the LSQ gradient
(Esser et al. 2019, eq. 3): ``d x_hat / d s = round(x/s) - x/s`` inside the grid and
``qmin - zp`` / ``qmax - zp`` at the clip points, scaled by ``g = 1 / sqrt(N * Qp)``.
Also here: the torch-side model surgery QAT needs (fx tracing, Conv+BN pairs and folding).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from edgeslim.errors import ModelError
from edgeslim.quantize.lower import activation_params
from edgeslim.runtime.ort import first_line

ACT_QMIN, ACT_QMAX = -128, 127  # per-tensor asymmetric int8 activations
W_QMAX = 127  # per-channel symmetric int8 weights in [-127, 127]
EMA_AVERAGING = 0.01  # moving-average min/max observer constant (as in torch.ao)
_MIN_SCALE = 1e-12
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even in the forward pass, identity gradient (straight-through)."""
    return x + (torch.round(x) - x).detach()


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """Value ``x``, gradient multiplied by ``g`` (LSQ's step-size gradient scale)."""
    return (x - x * g).detach() + x * g


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | float, qmin: int, qmax: int) -> torch.Tensor:
    """``(clamp(round(x / s) + zp, qmin, qmax) - zp) * s`` with STE gradients (LSQ gradient for ``s``)."""
    q = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


class ActFakeQuant(nn.Module):
    """Per-tensor asymmetric int8 activation quantizer with an EMA min/max observer.

    Modes: ``observing`` (training forward updates the EMA range and derives (scale, zp) from it
    with :func:`activation_params`, the PTQ formula), then frozen: the scale is fixed, or learned
    with LSQ when ``learn`` is set; the zero point stays fixed so that ReLU outputs keep
    ``zp = qmin`` (ORT then drops the ReLU). ``calibrating`` collects a plain min/max instead.
    """

    def __init__(self, name: str = "") -> None:
        super().__init__()
        self.tensor_name = name
        self.scale = nn.Parameter(torch.tensor(1.0), requires_grad=False)
        self.register_buffer("zero_point", torch.tensor(0.0))
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("hi", torch.tensor(0.0))
        self.register_buffer("initialized", torch.tensor(False))
        self.enabled = True
        self.observing = True
        self.calibrating = False
        self.learn = False
        self.clip: tuple[float, float] | None = None  # bounds of a Clip (ReLU6) right before this quantizer

    def extra_repr(self) -> str:
        return f"{self.tensor_name!r}, scale={float(self.scale):.4g}, zero_point={int(self.zero_point)}"

    def params(self) -> tuple[float, int]:
        """The ``(scale, zero_point)`` the forward pass uses, as lower_qdq's ``act_params`` wants them."""
        return float(self.effective_scale().detach()), int(self.zero_point)

    def effective_scale(self) -> torch.Tensor:
        """The learned/observed scale, capped after a Clip so that ORT can drop the Clip.

        ORT removes Clip -> Q only if the Q's saturation bounds lie inside the clip range
        (ClipQuantFusion): (qmax - zp - 0.5) * s <= clip_max and (qmin - zp + 0.5) * s >= clip_min.
        Values outside the clip range never occur there, so the cap loses nothing.
        """
        scale = self.scale.clamp_min(_MIN_SCALE)
        if self.clip is not None:
            zp = float(self.zero_point)
            caps = [self.clip[1] / (ACT_QMAX - zp - 0.5)] if self.clip[1] > 0 else []
            caps += [self.clip[0] / (ACT_QMIN - zp + 0.5)] if self.clip[0] < 0 and ACT_QMIN - zp + 0.5 < 0 else []
            if caps:  # 1 - 1e-6: margin for float32 rounding of the bound products
                scale = torch.clamp(scale, max=min(caps) * (1 - 1e-6))
        return scale

    @torch.no_grad()
    def _observe(self, x: torch.Tensor, ema: bool) -> None:
        lo, hi = x.detach().min().float(), x.detach().max().float()
        if not bool(self.initialized):
            self.lo.copy_(lo), self.hi.copy_(hi), self.initialized.fill_(True)
        elif ema:
            self.lo.add_(EMA_AVERAGING * (lo - self.lo)), self.hi.add_(EMA_AVERAGING * (hi - self.hi))
        else:
            self.lo.copy_(torch.minimum(self.lo, lo)), self.hi.copy_(torch.maximum(self.hi, hi))
        self.sync_params()

    @torch.no_grad()
    def sync_params(self) -> None:
        """Set (scale, zero_point) from the observed range, exactly as PTQ would."""
        scale, zp = activation_params(float(self.lo), float(self.hi), "int8")
        self.scale.copy_(torch.tensor(scale, dtype=torch.float32))
        self.zero_point.fill_(float(zp))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            self._observe(x, ema=False)
        elif self.observing and self.training:
            self._observe(x, ema=True)
        if not self.enabled:
            return x
        scale = self.effective_scale()
        if self.learn and self.training:
            # LSQ: g = 1 / sqrt(N_F * Qp), N_F = features per sample, Qp = positive levels
            qp = max(ACT_QMAX - int(self.zero_point), 1)
            scale = grad_scale(scale, 1.0 / math.sqrt(max(x[0].numel() if x.dim() else 1, 1) * qp))
        return fake_quantize(x, scale, self.zero_point, ACT_QMIN, ACT_QMAX)


class WeightFakeQuant(nn.Module):
    """Per-output-channel symmetric int8 weight quantizer, ``q`` in [-127, 127].

    Without ``learn`` the scale tracks ``absmax / 127`` (what PTQ's ``quantize_weight`` uses);
    with ``learn`` it is an LSQ step size initialised there, ``g = 1 / sqrt(N_W * Qp)`` with
    ``N_W`` the weights per channel.
    """

    def __init__(self, weight: torch.Tensor, axis: int = 0, learn: bool = False) -> None:
        super().__init__()
        self.axis, self.learn, self.enabled = axis, learn, True
        self.scale = nn.Parameter(self._absmax_scale(weight.detach()), requires_grad=learn)
        self.per_channel_numel = max(weight.numel() // max(weight.shape[axis], 1), 1)

    def _absmax_scale(self, w: torch.Tensor) -> torch.Tensor:
        dims = [d for d in range(w.dim()) if d != self.axis]
        return (w.abs().amax(dim=dims).clamp_min(_MIN_SCALE) / W_QMAX).float()

    def _shape(self, w: torch.Tensor) -> list[int]:
        shape = [1] * w.dim()
        shape[self.axis] = -1
        return shape

    def current_scale(self, w: torch.Tensor) -> torch.Tensor:
        """Per-channel scales used for ``w`` (learned, or absmax / 127 of the current weight)."""
        if self.learn:
            return self.scale.clamp_min(_MIN_SCALE)
        return self._absmax_scale(w.detach())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        scale = self.current_scale(w)
        if self.learn and self.training:
            scale = grad_scale(scale, 1.0 / math.sqrt(self.per_channel_numel * W_QMAX))
        return fake_quantize(w, scale.view(self._shape(w)), 0.0, -W_QMAX, W_QMAX)

    @torch.no_grad()
    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 weights, float32 per-channel scales): exactly what the forward pass dequantizes."""
        scale = self.current_scale(w).detach().float()
        q = torch.clamp(torch.round(w / scale.view(self._shape(w))), -W_QMAX, W_QMAX).to(torch.int8)
        return q, scale


def bias_fake_quant(b: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """Bias on the int32 grid with scale ``x_scale * w_scale`` (Jacob et al. 2018, eq. 10).

    Computed as ``lower_qdq`` computes it (float64 product rounded to float32, then
    ``round(b / b_scale)``), so the simulated bias is the one ORT adds; gradient is identity.
    """
    with torch.no_grad():
        b_scale = (x_scale.detach().double() * w_scale.detach().double()).float().double()
        q = torch.clamp(torch.round(b.detach().double() / b_scale), -(2**31), 2**31 - 1)
        b_q = (q * b_scale).float()
    return b + (b_q - b).detach()


def folded_params(conv: nn.Module, bn: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight and bias of ``conv`` with ``bn`` (running statistics) folded in (differentiable).

    W' = W * g / sqrt(v + eps) per output channel;  b' = (b - m) * g / sqrt(v + eps) + beta.
    """
    w, b = conv.weight, conv.bias
    if bn is None:
        return w, b
    gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_var)
    factor = gamma / torch.sqrt(bn.running_var + bn.eps)
    w_fold = w * factor.reshape(-1, *[1] * (w.dim() - 1))
    b0 = b if b is not None else torch.zeros_like(bn.running_mean)
    return w_fold, (b0 - bn.running_mean) * factor + beta


class QuantWeighted(nn.Module):
    """A Conv (optionally with its BatchNorm) or Linear whose weight and bias are fake-quantized.

    Deploy form (eval, or BN frozen): ``op(x, fq(W'), fq_int32(b'))`` with BN folded using
    running statistics, exactly the integer kernel ORT runs. While BN still trains, the
    Krishnamoorthi 2018 (§3.2) / Jacob et al. 2018 (§3.2) scheme is used: quantize the weight
    folded with running statistics, divide the conv output by the fold factor again and apply
    BN with batch statistics, so running statistics keep updating and the quantized weight is
    the one that deploys.
    """

    def __init__(self, op: nn.Module, bn: nn.Module | None, learn: bool, input_quant: ActFakeQuant | None) -> None:
        super().__init__()
        self.op, self.bn = op, bn
        self.bn_frozen = bn is None
        self.enabled = True
        self._input_quant = [input_quant]  # a list: not registered as a child module
        w, _ = folded_params(op, bn)
        self.wq = WeightFakeQuant(w.detach(), axis=0, learn=learn)

    @property
    def input_quant(self) -> ActFakeQuant | None:
        return self._input_quant[0]

    def _apply_op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if isinstance(self.op, nn.Linear):
            return F.linear(x, w, b)
        return self.op._conv_forward(x, w, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            y = self.op(x)
            return self.bn(y) if self.bn is not None else y
        if self.bn is not None and self.training and not self.bn_frozen:
            gamma = self.bn.weight if self.bn.weight is not None else torch.ones_like(self.bn.running_var)
            factor = gamma / torch.sqrt(self.bn.running_var + self.bn.eps)
            factor = torch.where(factor.abs() < 1e-12, torch.full_like(factor, 1e-12), factor)
            w_hat = self.wq(self.op.weight * factor.reshape(-1, *[1] * (self.op.weight.dim() - 1)))
            view = [1, -1] + [1] * (x.dim() - 2)
            y = self._apply_op(x, w_hat, None) / factor.reshape(view)
            if self.op.bias is not None:
                y = y + self.op.bias.reshape(view)
            return self.bn(y)
        w, b = folded_params(self.op, self.bn)
        w_hat = self.wq(w)
        if b is not None and self.input_quant is not None and self.input_quant.enabled:
            b = bias_fake_quant(b, self.input_quant.effective_scale(), self.wq.current_scale(w))
        return self._apply_op(x, w_hat, b)


# ------------------------------------------------------------------------- model surgery
class _Tracer(fx.Tracer):
    """symbolic_trace that remembers which module was being traced when tracing failed."""

    def __init__(self) -> None:
        super().__init__()
        self.failed_in: str | None = None

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m) or type(m).__name__
            raise


def trace_model(model: nn.Module) -> fx.GraphModule:
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as err:
        where = tracer.failed_in or type(model).__name__
        raise ModelError(f"qat_int8: torch.fx cannot trace module {where!r}: {first_line(err)}") from None
    return fx.GraphModule(model, graph, type(model).__name__)


def node_scope(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack)[-1] if stack else ""


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def conv_bn_pairs(gm: fx.GraphModule) -> dict[fx.Node, fx.Node]:
    """Conv nodes whose only user is a BatchNorm module (folded during training and export)."""
    modules = dict(gm.named_modules())
    pairs = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], CONVS) and len(node.users) == 1:
            user = next(iter(node.users))
            bn = modules.get(user.target) if user.op == "call_module" else None
            if isinstance(bn, BATCHNORMS) and bn.track_running_stats and bn.running_var is not None:
                pairs[node] = user
    return pairs


def fold_source(source: nn.Module, pairs: list[tuple[str, str]]) -> nn.Module:
    """A float copy of ``source`` with each (conv, bn) pair folded (running statistics), BN -> Identity."""
    model = copy.deepcopy(source).eval()
    with torch.no_grad():
        for conv_path, bn_path in pairs:
            conv = model.get_submodule(conv_path)
            w, b = folded_params(conv, model.get_submodule(bn_path))
            conv.weight = nn.Parameter(w.detach().clone())
            conv.bias = nn.Parameter(b.detach().clone())
            set_submodule(model, bn_path, nn.Identity())
    return model
