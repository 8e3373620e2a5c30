"""Full-Jacobian decomposition of a network output: input-Jacobian · x plus one bias-Jacobian per biased layer.

Seed 001 Prop. 2 (thesis §3.4, Eq. 3.1): for a ReLU network with biases ``b``,
``f(x) = ∇ₓf(x)ᵀx + Σ_layers ∇_{b_l}f(x)ᵀb_l``. A layer ``z = W x + b`` has ``∇_b f = ∇_z f`` with the bias
broadcast over the positions where it is added, so its *bias-Jacobian* ``f^b = ∇_z f ⊙ b`` has the shape of
the layer's output ``z`` (thesis §3.4.2). Sources of bias (001 §3.2): Conv (any dimension, transposed too)
and Linear bias parameters, and BatchNorm's effective bias ``b_bn = β − μγ/σ`` (``σ = sqrt(var + eps)``).

Each bias is paired with the gradient of *its own* module's output through a forward hook that records the
output's gradient edge (:func:`torch.autograd.graph.get_gradient_edge`); one ``autograd.grad`` call returns
the gradients w.r.t. the input and every recorded output together, so the pairing never depends on module
order and residual networks are decomposed correctly. An edge references the autograd node that produced the
output, so an in-place op that follows (``ReLU(inplace=True)``, ``out += identity``) does not change the
gradient it receives: the gradient w.r.t. the layer's own output value (tested on torchvision ResNets). An
output that is a view is copied first (an in-place op on a view re-routes its base's history).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from . import nn as fnn
from ._device_checks import assert_in_range

__all__ = ["FullJacobian", "full_jacobian"]

_FUSED_BN_RELU = (fnn.BatchNormReLU1d, fnn.BatchNormReLU2d, fnn.BatchNormReLU3d)


@dataclass(eq=False)
class FullJacobian:
    """Result of :func:`full_jacobian`: the terms of ``f(x) = ∇ₓf·x + Σ_l Σ f^b_l`` for each sample.

    Attributes:
        output: the model output ``(N, K)``.
        target: the decomposed class per sample ``(N,)`` (long).
        input: the input ``x`` the decomposition was computed at.
        input_jacobian: ``∇ₓ f`` of the target output, shaped like ``x``.
        bias_jacobians: layer name -> bias-Jacobian ``∇_z f ⊙ b``, shaped like that layer's output ``z``.
            A module called ``k > 1`` times has entries ``name``, ``name#1``, ..., ``name#{k-1}`` in call order.
        layer_types: layer name -> ``"conv"``, ``"linear"``, ``"batch_norm"`` or ``"batch_norm_relu"``.
        complete: True when every biased layer was decomposed (``layers=None``); only then is
            :meth:`residual` the completeness error.
        unmodelled: names of modules holding a ``bias`` tensor that the decomposition does not model
            (LayerNorm, GroupNorm, Bilinear, ...); their contribution is part of the residual.
    """

    output: Tensor
    target: Tensor
    input: Tensor
    input_jacobian: Tensor
    bias_jacobians: dict[str, Tensor]
    layer_types: dict[str, str] = field(default_factory=dict)
    complete: bool = True
    unmodelled: tuple[str, ...] = ()

    @property
    def value(self) -> Tensor:
        """``f(x)``: the target output of each sample, ``(N,)``."""
        return self.output.gather(1, self.target[:, None]).squeeze(1)

    def input_term(self) -> Tensor:
        """``∇ₓf(x)ᵀx`` per sample, ``(N,)``."""
        return (self.input_jacobian * self.input).flatten(1).sum(1)

    def bias_terms(self) -> dict[str, Tensor]:
        """Layer name -> the sum of its bias-Jacobian per sample, ``(N,)``."""
        return {name: bj.flatten(1).sum(1) for name, bj in self.bias_jacobians.items()}

    def total(self) -> Tensor:
        """Sum of all terms, ``∇ₓf·x + Σ_l Σ f^b_l``, per sample ``(N,)``."""
        total = self.input_term()
        for term in self.bias_terms().values():
            total = total + term.to(total.dtype)
        return total

    def residual(self) -> Tensor:
        """Completeness error ``f(x) − total()`` per sample, ``(N,)``.

        Zero up to rounding for networks that are piecewise linear in ``x`` and their biases jointly: ReLU
        (or no) activations, max/average pooling, residual additions, Conv/Linear, BatchNorm in eval mode.
        Not zero, and reported as is, for: smooth activations (Softplus, GELU, ...: their intercepts are
        implicit biases, 001 §3.2), BatchNorm using batch statistics (training mode, or eval without running
        statistics: the output depends on x through μ and σ too), and modules listed in ``unmodelled``.
        """
        if not self.complete:
            raise ValueError(
                "FullJacobian.residual: only the layers passed as `layers` were decomposed, so the terms do not "
                "sum to the output; call full_jacobian(..., layers=None) for a completeness check"
            )
        return self.value - self.total().to(self.value.dtype)

    def relative_residual(self) -> Tensor:
        """``|residual| / (|f(x)| + |∇ₓf·x| + Σ_l |Σ f^b_l|)`` per sample (0 where that scale is 0), ``(N,)``.

        Relative to the size of the terms, not of ``f(x)`` alone, which can be near 0 while the terms are not.
        """
        scale = self.value.abs() + self.input_term().abs()
        for term in self.bias_terms().values():
            scale = scale + term.abs().to(scale.dtype)
        res = self.residual().abs()
        return torch.where(scale > 0, res / torch.where(scale > 0, scale, torch.ones_like(scale)), res * 0)

    def summary(self) -> str:
        """One line: number of terms and the largest absolute / relative completeness error."""
        head = f"FullJacobian: input term + {len(self.bias_jacobians)} bias-Jacobians"
        if not self.complete:
            return head + " (subset of layers: no completeness check)"
        res, rel = self.residual().detach(), self.relative_residual().detach()
        tail = f"; max |residual| {res.abs().max().item():.3g}, max relative {rel.max().item():.3g}"
        if self.unmodelled:
            tail += f"; unmodelled biased modules: {', '.join(self.unmodelled)}"
        return head + tail


def _layer_type(module: nn.Module) -> Optional[str]:
    """The kind of bias ``module`` contributes, or None when it has none that is modelled."""
    if isinstance(module, _FUSED_BN_RELU):
        return "batch_norm_relu"
    if isinstance(module, _BatchNorm):
        return "batch_norm"
    if isinstance(module, _ConvNd) and module.bias is not None:
        return "conv"
    if isinstance(module, nn.Linear) and module.bias is not None:
        return "linear"
    return None


def _channel_view(bias: Tensor, ndim: int, dim: int) -> Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return bias.reshape(shape)


def _batch_norm_effective_bias(module: _BatchNorm, input: Tensor) -> Tensor:
    """``β − μγ/sqrt(var + eps)`` per channel (001 §3.2) with the statistics the forward used.

    Mirrors ``_BatchNorm.forward``: batch statistics (biased variance) in training mode and in eval mode
    without running buffers, running statistics otherwise. ``γ = 1``, ``β = 0`` for a non-affine layer.
    """
    batch_stats = module.training or (module.running_mean is None and module.running_var is None)
    stat_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    if batch_stats:
        dims = [0] + list(range(2, input.dim()))
        xs = input.to(stat_dtype)
        mean, var = xs.mean(dims), xs.var(dims, unbiased=False)
    else:
        mean, var = module.running_mean.to(stat_dtype), module.running_var.to(stat_dtype)
    scale = (var + module.eps).rsqrt()
    if module.weight is not None:
        scale = scale * module.weight.to(stat_dtype)
    bias = -mean * scale
    if module.bias is not None:
        bias = bias + module.bias.to(stat_dtype)
    return bias


class _Recorder:
    """Forward hooks that record, per call of each chosen module, its output's gradient edge and its bias."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.records: list[dict] = []
        self._calls: dict[str, int] = {}
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output):
            if not isinstance(output, Tensor):
                raise TypeError(f"full_jacobian: layer {name!r} returned {type(output).__name__}, expected a Tensor")
            # An in-place op on a view re-routes its base's history past the view's node: record a copy.
            copied = output.requires_grad and output._is_view()
            if copied:
                output = output.clone()
            self._record(name, module, args[0], output)
            return output if copied else None

        return hook

    def _record(self, name: str, module: nn.Module, input: Tensor, output: Tensor) -> None:
        calls = self._calls.get(name, 0)
        self._calls[name] = calls + 1
        kind = _layer_type(module)
        if kind in ("batch_norm", "batch_norm_relu"):
            bias, dim = _batch_norm_effective_bias(module, input), 1
        elif kind == "conv":
            bias, dim = module.bias, output.dim() - len(module.kernel_size) - 1
        else:  # linear
            bias, dim = module.bias, output.dim() - 1
        self.records.append(dict(
            name=name if calls == 0 else f"{name}#{calls}",
            kind=kind,
            bias=_channel_view(bias, output.dim(), dim),
            shape=output.shape,
            dtype=output.dtype,
            edge=get_gradient_edge(output) if output.requires_grad else None,
            # The fused op's ReLU mask is exactly y > 0 or y NaN (csrc/KERNELS.md, "Fused ReLU", "ReLU and NaN").
            mask=~(output.detach() <= 0) if kind == "batch_norm_relu" else None,
        ))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _select_modules(model: nn.Module, layers: Optional[Iterable[str]]) -> dict[str, nn.Module]:
    named = dict(model.named_modules())
    if layers is None:
        return {name: m for name, m in named.items() if _layer_type(m) is not None}
    if isinstance(layers, str):
        layers = [layers]
    chosen = {}
    for name in layers:
        if name not in named:
            available = [n for n, m in named.items() if _layer_type(m) is not None]
            raise ValueError(
                f"full_jacobian: layer {name!r} not found in the model; layers with a bias: {available}"
            )
        if _layer_type(named[name]) is None:
            raise ValueError(
                f"full_jacobian: layer {name!r} ({type(named[name]).__name__}) has no bias to decompose; "
                "expected a Conv or Linear with bias, or a BatchNorm"
            )
        chosen[name] = named[name]
    return chosen


def _unmodelled(model: nn.Module) -> tuple[str, ...]:
    return tuple(
        name for name, m in model.named_modules()
        if _layer_type(m) is None and isinstance(getattr(m, "bias", None), Tensor)
    )


def _check_target(target, output: Tensor) -> Tensor:
    n, k = output.shape
    if target is None:
        return output.detach().argmax(1)
    if isinstance(target, int):
        target = torch.full((n,), target, dtype=torch.long, device=output.device)
    if not isinstance(target, Tensor) or target.dtype not in (torch.int32, torch.int64, torch.uint8):
        raise TypeError("full_jacobian: target must be None, an int, or an integer tensor of shape (N,)")
    if target.shape != (n,):
        raise ValueError(
            f"full_jacobian: target must have shape ({n},) (one class per sample), got {tuple(target.shape)}"
        )
    if n:
        assert_in_range(target, k, lambda: f"full_jacobian: target classes must lie in [0, {k}), got {target.tolist()}")
    return target.to(device=output.device, dtype=torch.long)


def full_jacobian(
    model: nn.Module,
    x: Tensor,
    target=None,
    *,
    layers: Optional[Iterable[str]] = None,
    create_graph: bool = True,
    retain_graph: Optional[bool] = None,
) -> FullJacobian:
    """Decompose the target output into input-Jacobian · x plus bias-Jacobians (001 Prop. 2, thesis Eq. 3.1).

    Args:
        model: any ``nn.Module`` mapping ``x`` to an ``(N, K)`` output, plain or :func:`fastjac.convert`-ed.
        x: the input batch ``(N, ...)``; gradients are taken w.r.t. it (a detached copy is used when it does
            not require grad).
        target: the class decomposed per sample: an integer tensor ``(N,)``, one int for all samples, or None
            for each sample's own top class (``argmax`` of the output, not differentiated).
        layers: names (``model.named_modules()``) of the biased layers to decompose; None = every Conv /
            Linear with a bias and every BatchNorm. A subset makes the result incomplete (no residual).
        create_graph: keep the graph of the Jacobians so that losses built on them can be trained (double
            backward); False for saliency maps and teachers (the results are then detached).
        retain_graph: passed to ``torch.autograd.grad``; defaults to ``create_graph``.

    ``f`` is ``Σ_n output[n, target[n]]``; its gradient w.r.t. sample n's input and layer outputs is the
    per-sample gradient when samples are independent (eval mode). With BatchNorm using batch statistics the
    samples are coupled and the terms are those of the batch sum (what a training loss differentiates); the
    per-sample residual is then not zero. BatchNorm layers contribute ``(∇_z f) ⊙ (β − μγ/σ)``; for a fused
    ``BatchNormReLU`` (output ``y = relu(z)``) ``∇_z f = ∇_y f ⊙ [y > 0 or NaN]``. One forward pass is run (in
    training mode it updates BatchNorm running statistics like any forward).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"full_jacobian: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError("full_jacobian: x must be a floating-point tensor of shape (N, ...)")
    if retain_graph is None:
        retain_graph = create_graph
    modules = _select_modules(model, layers)
    if not x.requires_grad:
        x = x.detach().requires_grad_(True)

    recorder = _Recorder(modules)
    try:
        with torch.enable_grad():
            output = model(x)
    finally:
        recorder.remove()
    if not isinstance(output, Tensor) or output.dim() != 2 or output.shape[0] != x.shape[0]:
        shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise ValueError(f"full_jacobian: the model output must be a tensor of shape (N={x.shape[0]}, K), got {shape}")
    target = _check_target(target, output)

    records = recorder.records
    with torch.enable_grad():
        f = output.gather(1, target[:, None]).sum()
        edged = [r for r in records if r["edge"] is not None]
        grads = torch.autograd.grad(
            f, [x] + [r["edge"] for r in edged],
            create_graph=create_graph, retain_graph=retain_graph, allow_unused=True,
        )
        by_record = {id(r): g for r, g in zip(edged, grads[1:])}
        input_jacobian = grads[0] if grads[0] is not None else torch.zeros_like(x)
        bias_jacobians, layer_types = {}, {}
        for r in records:
            grad = by_record.get(id(r))
            if grad is None:
                grad = torch.zeros(r["shape"], dtype=r["dtype"], device=output.device)
            if r["mask"] is not None:
                grad = torch.where(r["mask"], grad, torch.zeros_like(grad))
            bias = r["bias"] if create_graph else r["bias"].detach()
            bias_jacobians[r["name"]] = (grad * bias).to(r["dtype"])
            layer_types[r["name"]] = r["kind"]
    if not create_graph:
        input_jacobian = input_jacobian.detach()
    return FullJacobian(
        output=output,
        target=target,
        input=x,
        input_jacobian=input_jacobian,
        bias_jacobians=bias_jacobians,
        layer_types=layer_types,
        complete=layers is None,
        unmodelled=_unmodelled(model),
    )
