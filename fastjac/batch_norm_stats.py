"""Batch-norm statistics for extra forward passes: record them on the clean pass, replay them as constants.

Estimators that run a model more than once per training step (perturbed inputs for finite differences,
forward-mode passes for JVPs, a second pass for a Jacobian, a feature-only pass) meet a problem with
BatchNorm layers that normalise with *batch* statistics (training mode, or no running buffers): each extra
pass would normalise with its own batch's statistics (the perturbed batch is a different batch) and would
update the running statistics again.

The choice made here, used by :func:`fastjac.input_jacobian` and the losses of :mod:`fastjac.losses`:

* the **clean pass** is an ordinary forward: batch statistics, running statistics updated exactly once;
  :func:`record_batch_norm_stats` notes, per BatchNorm call, the batch mean and the biased batch variance
  it normalised with (detached): a fused :mod:`fastjac.nn` BatchNorm on the C++ chain hands over its own
  ``(mean, invstd)``, any other is measured with one ``var_mean`` of its input;
* every **extra pass** runs under :meth:`BatchNormStats.frozen`: each such BatchNorm normalises with the
  recorded clean-batch statistics as constants (its eval-mode formula with the recorded mean / variance in
  place of the running buffers), so no statistic depends on the extra pass's batch and nothing (running
  mean, running variance, ``num_batches_tracked``) is updated.

Inside ``frozen()`` a BatchNorm is therefore a fixed per-channel affine map, and the model a per-sample
function of its input: that is the function whose input-Jacobian the estimators estimate (its derivative
does not flow through the batch statistics).

*Constant in the input, or in the parameters too.* By default the recorded statistics are constants
altogether (detached): a loss on an extra pass is then differentiated as if the statistics did not depend
on the parameters either. That breaks BatchNorm's scale invariance for the loss's parameter gradient: with
the statistics held fixed, shrinking the weights of the layer before a BatchNorm seems to shrink the
input-Jacobian, while the next clean pass renormalises them away. Measured on digits E2
(``benchmarks/RESULTS.md``, "BatchNorm semantics"): up to 40 % of the Jacobian penalty's gradient on the
first convolutions points along the weights, and training with it fails to reduce the penalty. With
``record_batch_norm_stats(model, differentiable=True)`` and ``frozen(differentiable=True)`` the statistics
stay constant in the extra pass's *input* (each row is still that sample's own Jacobian, same values) but
remain functions of the *parameters* through the clean pass, so the loss is differentiated through
them as training-mode BatchNorm is; the extra pass then applies each BatchNorm as the affine map
``x · γ/√(σ²+ε) + (β − μγ/√(σ²+ε))`` (and ReLU for a fused ``BatchNormReLU``) built from autograd ops.

Works for every ``torch.nn`` BatchNorm subclass (including
:mod:`fastjac.nn` ``BatchNormNd`` / ``BatchNormReLUNd``, whose eval path is their fused op), since only the
``training`` flag and the two running buffers are swapped, for the duration of each call.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .ops import relu
from .ops.batch_norm import StatsSink, reset_stats_sink, set_stats_sink

__all__ = ["BatchNormStats", "record_batch_norm_stats", "uses_batch_stats"]


def uses_batch_stats(module: nn.Module) -> bool:
    """True for a BatchNorm module that normalises with batch statistics in its current mode (training
    mode, or eval mode without running buffers), exactly as ``nn.BatchNorm``'s forward decides."""
    if not isinstance(module, _BatchNorm):
        return False
    return module.training or (module.running_mean is None and module.running_var is None)


def _batch_mean_var(x: Tensor, differentiable: bool = False) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance over every dim except 1, as BatchNorm normalises with (detached
    unless ``differentiable``)."""
    dims = [d for d in range(x.dim()) if d != 1]
    src = x if differentiable else x.detach()
    if src.dtype in (torch.float16, torch.bfloat16):
        src = src.float()
    var, mean = torch.var_mean(src, dim=dims, unbiased=False)
    return mean, var


class BatchNormStats:
    """Batch statistics of the batch-statistics BatchNorm calls of one clean forward of ``model``.

    Built by :func:`record_batch_norm_stats`. ``stats[module]`` is the list of ``(mean, var)`` pairs, one
    per call of that module in the recorded pass (a module used twice has two). Replay with
    :meth:`frozen`.
    """

    def __init__(self, model: nn.Module, differentiable: bool = False):
        self.model = model
        self.differentiable = differentiable
        self.names = {m: name for name, m in model.named_modules() if uses_batch_stats(m)}
        self.modules = list(self.names)
        self.stats: dict[nn.Module, list[tuple[Tensor, Tensor]]] = {m: [] for m in self.modules}

    def __bool__(self) -> bool:
        """True when the model has at least one BatchNorm normalising with batch statistics."""
        return bool(self.modules)

    @contextlib.contextmanager
    def frozen(self, differentiable: bool = False) -> Iterator[None]:
        """Run forward passes that normalise with the recorded clean-batch statistics as constants.

        ``differentiable``: constants in the input only, still functions of the parameters (see the module
        docstring); needs statistics recorded with ``differentiable=True``.

        Each BatchNorm call uses the recorded statistics of the same call index (the counters restart
        at every entry, so enter once per extra pass). The modules' running statistics and
        ``num_batches_tracked`` are left untouched. A call beyond those recorded (or of a layer the clean
        pass did not reach) raises an error.
        """
        if differentiable and not self.differentiable:
            raise ValueError("BatchNormStats.frozen(differentiable=True) needs statistics recorded with "
                             "record_batch_norm_stats(model, differentiable=True)")
        calls = {m: 0 for m in self.modules}
        saved: dict[nn.Module, tuple] = {}
        current: dict[nn.Module, tuple[Tensor, Tensor]] = {}

        def before(module, args):
            index = calls[module]
            recorded = self.stats[module]
            if not recorded:
                raise RuntimeError(
                    f"fastjac.BatchNormStats.frozen: no statistics were recorded for BatchNorm layer {self.names[module]!r}; "
                    "run the clean forward pass (through this layer) inside record_batch_norm_stats(model) first"
                )
            if index >= len(recorded):
                raise RuntimeError(
                    f"fastjac.BatchNormStats.frozen: BatchNorm {self.names[module]!r} called {index + 1} times "
                    f"in a frozen pass but only {len(recorded)} call(s) were recorded in the clean pass"
                )
            calls[module] = index + 1
            mean, var = recorded[index]
            current[module] = (mean, var)
            if module not in saved:
                saved[module] = (module.training, module._buffers.get("running_mean"), module._buffers.get("running_var"))
            module.training = False  # readers of the buffers (fastjac.full_jacobian) see the recorded statistics
            module._buffers["running_mean"] = mean.detach()
            module._buffers["running_var"] = var.detach()

        def after(module, args, output):
            _restore(module)

        def _restore(module):
            if module in saved:
                training, rm, rv = saved.pop(module)
                module.training = training
                module._buffers["running_mean"] = rm
                module._buffers["running_var"] = rv

        handles, replaced = [], []
        try:
            for m in self.modules:
                handles.append(m.register_forward_pre_hook(before))
                handles.append(m.register_forward_hook(after))
                if differentiable:  # an instance attribute shadows the class's forward for this pass only
                    m.forward = _affine_forward(m, current)
                    replaced.append(m)
            yield
        finally:
            for h in handles:
                h.remove()
            for m in replaced:
                del m.forward
            for m in list(saved):  # a pass interrupted by an exception inside a BatchNorm
                _restore(m)


@contextlib.contextmanager
def record_batch_norm_stats(model: nn.Module, differentiable: bool = False) -> Iterator[BatchNormStats]:
    """Record, during the forward passes run inside, the batch mean and biased batch variance that each
    batch-statistics BatchNorm of ``model`` normalises with (see the module docstring for the semantics;
    ``differentiable``: keep them in the autograd graph, for ``frozen(differentiable=True)``).

    The passes themselves are ordinary (running statistics are updated as usual, once per pass). Use the
    yielded :class:`BatchNormStats` afterwards with ``stats.frozen()`` for the extra passes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastjac.record_batch_norm_stats: model must be a torch.nn.Module, got {type(model).__name__}")
    stats = BatchNormStats(model, differentiable)
    open_sinks: dict[nn.Module, tuple] = {}  # (sink, token) of the module's call in progress (a BatchNorm has no
    # submodules, so it is never re-entered)

    def before(module, args):
        sink = StatsSink(differentiable)
        open_sinks[module] = (sink, set_stats_sink(sink))

    def record(module, args, output):
        sink, token = open_sinks.pop(module)
        reset_stats_sink(token)
        x = args[0]
        if sink.stats is not None and x.numel():
            # the fused op's own statistics (fastjac.ops.batch_norm.StatsSink): var = 1 / invstd^2 - eps, so that
            # the replay's 1 / sqrt(var + eps) is the clean pass's invstd (to rounding), with no pass over x
            mean, invstd = sink.stats
            var = (invstd.double().reciprocal().square() - module.eps).to(invstd.dtype)
            if not differentiable:
                mean, var = mean.detach(), var.detach()
        else:  # a torch BatchNorm, or a fused one on the Python chain
            mean, var = _batch_mean_var(x, differentiable)
        buffer = module._buffers.get("running_mean")
        dtype = buffer.dtype if buffer is not None else mean.dtype
        stats.stats[module].append((mean.to(dtype), var.to(dtype)))

    handles = [h for m in stats.modules
               for h in (m.register_forward_pre_hook(before), m.register_forward_hook(record))]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
        for _, token in open_sinks.values():  # a call interrupted by an exception: leave no sink set
            reset_stats_sink(token)


def _affine_forward(module: _BatchNorm, current: dict):
    """The forward of ``module`` in a ``frozen(differentiable=True)`` pass: the per-channel affine map of
    BatchNorm with the recorded (graph) statistics, ``x · s + (β − μ s)`` with ``s = γ/√(σ²+ε)``, then ReLU
    for a fused ``BatchNormReLU`` module (its ``_fuse_relu``), with fastjac's ReLU."""

    def forward(x: Tensor) -> Tensor:
        mean, var = current[module]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        scale = torch.rsqrt(var + module.eps)
        if module.weight is not None:
            scale = scale * module.weight
        shift = -mean * scale
        if module.bias is not None:
            shift = shift + module.bias
        y = torch.addcmul(shift.view(shape).to(x.dtype), x, scale.view(shape).to(x.dtype))
        return relu(y) if getattr(module, "_fuse_relu", False) else y

    return forward
