"""Input-Jacobians of a classifier's outputs: exact (double backward), forward-mode (JVP) and finite differences.

Seed 000 §3-4: the Jacobian ``J = d f(x) / d x`` of the K outputs with respect to the input, per sample.
§4.1: usually only one row is needed, that of the correct class (``mode="target"``) or, without labels,
of the model's own top class (``mode="top"``). See :func:`input_jacobian` for the full contract.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad

from ._device_checks import assert_in_range
from .batch_norm_stats import BatchNormStats, record_batch_norm_stats
from .nn.one_pass import why_not_one_pass
from .ops.frozen_backward import FrozenBackward

__all__ = ["InputJacobian", "input_jacobian"]

MODES = ("target", "top", "all", "projection")
ESTIMATORS = ("exact", "jvp", "finite_difference")
OUTPUTS = ("logits", "log_softmax", "softmax")
PROBES = ("rademacher", "gaussian")
BATCH_NORM = ("frozen", "live")


class InputJacobian:
    """Result of :func:`input_jacobian`; unpacks as ``outputs, jacobian = result``.

    Attributes: ``outputs`` (N x K, the clean pass, after the ``output`` transform), ``jacobian`` (shape
    in :func:`input_jacobian`'s table), ``target`` (N class indices for modes "target"/"top", else None),
    ``probes`` (N x S x input shape, the unscaled input probes z of "jvp"/"finite_difference", else None),
    ``output_probes`` (N x S x K, the unscaled output probes v of mode "projection", else None),
    ``kind`` ("rows": full input-space rows; "directional": derivatives along the input probes).
    """

    def __init__(self, outputs, jacobian, target, probes, output_probes, kind):
        self.outputs, self.jacobian, self.target = outputs, jacobian, target
        self.probes, self.output_probes, self.kind = probes, output_probes, kind

    def __iter__(self):
        return iter((self.outputs, self.jacobian))

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index):
        return (self.outputs, self.jacobian)[index]

    def rows(self) -> Tensor:
        """Input-space rows: the Jacobian itself for ``kind == "rows"``; for directional derivatives the
        unbiased sketch ``(1/S) sum_s (J z_s) z_s^T`` (E[z z^T] = I), whose variance is about ``D/S``
        times the squared row norm (D = input size): useful for inspection, too noisy for losses."""
        if self.kind == "rows":
            return self.jacobian
        s = self.probes.shape[1]
        z = self.probes.flatten(2)  # N x S x D
        d = self.jacobian * math.sqrt(s)  # undo the 1/sqrt(S) scaling: d = J z
        if d.dim() == 2:  # N x S
            rows = torch.einsum("ns,nsd->nd", d, z) / s
        else:  # N x K x S
            rows = torch.einsum("nks,nsd->nkd", d, z) / s
        return rows.reshape(*rows.shape[:-1], *self.probes.shape[2:])

    def __repr__(self) -> str:
        return f"InputJacobian(outputs={tuple(self.outputs.shape)}, jacobian={tuple(self.jacobian.shape)}, kind={self.kind!r})"


def _check_choice(value, name: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"fastjac.input_jacobian: {name} must be one of {choices}, got {value!r}")


def _transform(outputs: Tensor, output: str, temperature: float) -> Tensor:
    if output == "logits":
        return outputs
    scaled = outputs / temperature
    return F.log_softmax(scaled, dim=1) if output == "log_softmax" else F.softmax(scaled, dim=1)


def _draw(kind: str, shape, like: Tensor, generator) -> Tensor:
    """Unit-variance probes: Rademacher (+-1) or standard normal, in ``like``'s dtype and device."""
    if kind == "gaussian":
        return torch.randn(shape, generator=generator, dtype=like.dtype, device=like.device)
    bits = torch.randint(0, 2, shape, generator=generator, device=like.device)
    return (2 * bits - 1).to(like.dtype)


def _check_probes(t: Optional[Tensor], name: str, shape) -> None:
    if t is not None and (not isinstance(t, Tensor) or tuple(t.shape) != tuple(shape)):
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"fastjac.input_jacobian: {name} must have shape {tuple(shape)} (N x samples x ...), got {got}")


def _check_target(target, n: int, k: int) -> Tensor:
    if not isinstance(target, Tensor) or target.dtype != torch.long or tuple(target.shape) != (n,):
        got = f"{target.dtype} tensor of shape {tuple(target.shape)}" if isinstance(target, Tensor) else repr(target)
        raise ValueError(f"fastjac.input_jacobian: target must be a LongTensor of shape ({n},) (one class per sample), got {got}")
    if n:
        assert_in_range(target, k, lambda: f"fastjac.input_jacobian: target values must lie in [0, {k}) (the model has "
                                           f"{k} outputs), got min {int(target.min())}, max {int(target.max())}")
    return target


class _Runner:
    """Runs the clean pass and the extra passes of one :func:`input_jacobian` call.

    Extra passes replay the global random-number state of the clean pass (same dropout masks) and, when
    the model has batch-statistics BatchNorms, run under :meth:`BatchNormStats.frozen`.
    """

    def __init__(self, model: Callable, output: str, temperature: float, stats: Optional[BatchNormStats], device,
                 detach_parameters: bool):
        self.model, self.output, self.temperature, self.stats = model, output, temperature, stats
        self.call = model
        if detach_parameters and isinstance(model, nn.Module):
            # Teacher calls: the parameters enter as detached constants, so no graph node ever leads to them.
            params = {name: p.detach() for name, p in model.named_parameters()}
            self.call = lambda x: torch.func.functional_call(model, params, (x,))
        self.devices = [device] if device.type == "cuda" else []
        self.rng = None

    def outputs(self, x: Tensor) -> Tensor:
        out = self.call(x)
        if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"fastjac.input_jacobian: the model must return an N x K tensor for N = {x.shape[0]} inputs, got {got}")
        return _transform(out, self.output, self.temperature)

    def clean(self, x: Tensor, record: bool) -> Tensor:
        self.rng = (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in self.devices])
        if record:
            with record_batch_norm_stats(self.model) as stats:
                out = self.outputs(x)
            self.stats = stats
            return out
        with self._frozen():
            return self.outputs(x)

    def _frozen(self):
        return self.stats.frozen() if self.stats else contextlib.nullcontext()

    def extra(self, x: Tensor) -> Tensor:
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.rng[0])
            for d, state in zip(self.devices, self.rng[1]):
                torch.cuda.set_rng_state(state, d)
            with self._frozen():
                return self.outputs(x)


def _select(out: Tensor, mode: str, target: Optional[Tensor], v: Optional[Tensor]) -> Tensor:
    """The quantity whose derivative is wanted, per sample: N (target/top, projection) or N x K (all)."""
    if mode in ("target", "top"):
        return out.gather(1, target[:, None])[:, 0]
    if mode == "projection":
        return (out * v).sum(1)
    return out


def _grad(scalar: Tensor, x: Tensor, create_graph: bool, retain: bool) -> Tensor:
    if not scalar.requires_grad:  # the outputs do not depend on anything differentiable
        return torch.zeros_like(x)
    (g,) = torch.autograd.grad(scalar, x, create_graph=create_graph, retain_graph=retain or create_graph, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def _exact(x: Tensor, out: Tensor, mode, target, v, create_graph) -> Tensor:
    if mode in ("target", "top"):
        return _grad(_select(out, mode, target, None).sum(), x, create_graph, False)
    if mode == "all":
        k = out.shape[1]
        return torch.stack([_grad(out[:, i].sum(), x, create_graph, i < k - 1) for i in range(k)], dim=1)
    s = v.shape[1]
    rows = [_grad((out * v[:, j]).sum(), x, create_graph, j < s - 1) for j in range(s)]
    return torch.stack(rows, dim=1) / math.sqrt(s)


def _tangents(runner: _Runner, x: Tensor, z: Tensor, estimator: str, sigma: float, pair_in_one_pass: bool) -> Tensor:
    """Directional derivatives of the outputs along z (same shape as x): jvp, or central differences."""
    if estimator == "jvp":
        with forward_ad.dual_level():
            y = runner.extra(forward_ad.make_dual(x, z))
            tangent = forward_ad.unpack_dual(y).tangent
        return torch.zeros_like(y) if tangent is None else tangent  # None: outputs independent of the input
    if pair_in_one_pass:
        plus, minus = runner.extra(torch.cat([x + sigma * z, x - sigma * z])).chunk(2)
    else:
        plus, minus = runner.extra(x + sigma * z), runner.extra(x - sigma * z)
    return (plus - minus) / (2 * sigma)


def _directional(runner: _Runner, x: Tensor, z: Tensor, mode, target, v, estimator, sigma, vectorize) -> Tensor:
    """Derivatives along each probe z_s, scaled by 1/sqrt(S): N x S, or N x K x S for mode "all"."""
    n, s = z.shape[:2]
    if vectorize:  # one pass over the S * N (probe-major) batch
        x_rep = x.unsqueeze(0).expand(s, *x.shape).reshape(s * n, *x.shape[1:])
        z_rep = z.transpose(0, 1).reshape(s * n, *x.shape[1:])
        tangents = _tangents(runner, x_rep, z_rep, estimator, sigma, True).reshape(s, n, -1).unbind(0)
    else:
        tangents = [_tangents(runner, x, z[:, j], estimator, sigma, False) for j in range(s)]
    results = [_select(t, mode, target, None if v is None else v[:, j]) for j, t in enumerate(tangents)]
    return torch.stack(results, dim=-1) / math.sqrt(s)


def input_jacobian(
    model: Callable,
    x: Tensor,
    target: Optional[Tensor] = None,
    *,
    mode: str = "target",
    estimator: str = "exact",
    create_graph: bool = True,
    samples: int = 1,
    sigma: float = 1e-3,
    probe: str = "rademacher",
    generator: Optional[torch.Generator] = None,
    probes: Optional[Tensor] = None,
    output_probes: Optional[Tensor] = None,
    output: str = "logits",
    temperature: float = 1.0,
    batch_norm: str = "frozen",
    batch_norm_stats: Optional[BatchNormStats] = None,
    vectorize: bool = False,
) -> InputJacobian:
    """Model outputs and their input-Jacobian, per sample (seed 000 §3, §4.1). Unpacks as ``(outputs, jacobian)``.

    ``model`` maps ``x`` (N x input shape) to N x K outputs; ``output`` picks what is differentiated:
    ``"logits"`` (the outputs, Prop. 1-2), ``"log_softmax"`` / ``"softmax"`` of ``outputs / temperature``
    (Eq. 2-3). Write ``f`` for that N x K quantity and ``D`` for the input size; S = ``samples``.

    Modes (which rows of the per-sample K x D Jacobian ``J``):
      * ``"target"``: row ``target[n]`` (a LongTensor of N labels), §4.1;
      * ``"top"``: row of the model's own top class ``argmax f`` (label-free distillation); the classes
        used are in ``result.target`` (pass them as ``target`` to a student);
      * ``"all"``: every row (K backward passes with ``"exact"``; for small K);
      * ``"projection"``: ``v^T J`` for S random output probes ``v`` (``probe`` distribution, unit
        variance, so E[v v^T] = I): ``E ||v^T J||^2 = ||J||_F^2``.

    Estimators and what they return (shapes; ``...`` = the input shape):
      * ``"exact"``: reverse mode on the graph of one pass (double backward when the result is used in
        a loss). Rows, exact up to rounding: target/top N x ..., all N x K x ..., projection
        N x S x ... holding ``v_s^T J / sqrt(S)``, so the sum of squares over (S, ...) is the mean of S
        unbiased estimates of ``||J||_F^2`` (variance ``2 sum_{k != l} (J J^T)_{kl}^2 / S`` for Rademacher
        probes; Gaussian adds ``2 sum_k (J J^T)_{kk}^2 / S``).
      * ``"jvp"``: forward mode (``torch.autograd.forward_ad``), one pass per input probe z_s (S probes,
        ``probe`` distribution, unit variance): directional derivatives ``d_s = (row . z_s) / sqrt(S)``,
        shaped N x S (target/top; projection gives ``v_s^T J z_s / sqrt(S)``) or N x K x S (all). Exact for
        the directions drawn; as estimates, ``sum_s d_s^2`` is unbiased for the squared norm of the row
        (Frobenius for all / projection) and, with the same probes for two models,
        ``sum_s (d_s - d'_s)^2`` is unbiased for ``||row - row'||^2`` (Prop. 1), with relative standard
        deviation about ``sqrt(2 / S)`` (Gaussian probes). ``result.rows()`` gives unbiased full-row
        sketches (variance ~ D/S times the squared norm).
      * ``"finite_difference"``: forward passes only, the same directional derivatives by central
        differences ``(f(x + sigma z) - f(x - sigma z)) / (2 sigma)``: bias ``sigma^2/6 * f'''[z,z,z]``
        (zero for piecewise-linear networks when no kink lies within ``sigma |z|``), rounding error about
        ``eps_machine * |f| / sigma``; otherwise as ``"jvp"``. Differentiable through the passes (no
        double backward at all).

    Probes: drawn from ``generator`` (or the global generator), or given: ``probes`` (N x S x ..., for
    jvp / finite_difference) and ``output_probes`` (N x S x K, for projection); both are returned
    (``result.probes``, ``result.output_probes``) to reuse for a second model.

    ``create_graph=True``: ``jacobian`` (and ``outputs``) are differentiable with respect to the model's
    parameters (and ``x`` if it requires grad), for training losses. ``create_graph=False`` (teachers):
    detached results; the parameters enter every pass as detached constants
    (``torch.func.functional_call``), so no graph reaches them and no parameter ``.grad`` is touched; the
    only graph ("exact") runs from the input and is freed by the call.

    BatchNorm layers that normalise with batch statistics (training mode): the clean pass (``outputs``)
    is an ordinary forward that updates the running statistics exactly once. With ``batch_norm="frozen"``
    (default) the Jacobian is that of the per-sample function in which each BatchNorm uses the clean
    batch's statistics as constants (:mod:`fastjac.batch_norm_stats`); every estimator estimates the same
    quantity, extra passes never mix their statistics with the clean batch nor update running statistics
    ("exact" then differentiates one extra such pass). ``batch_norm="live"`` (exact only) differentiates
    the clean pass itself: row n is then ``d(sum_m f_m)/dx_n``, including derivatives through the batch
    statistics (cross-sample terms), as plain double backprop of a training-mode network does. Why
    "frozen" is the default: the per-sample Jacobian ``d f_n / d x_n`` of a training-mode network (through
    the statistics) differs from the frozen one by O(1/N) (the statistics' share), whereas "live" adds
    ``sum_{m != n} d f_m / d x_n``, O(1) in general (a small conv net, measured: relative error of frozen
    0.32 / 0.066 / 0.016 at N = 4 / 16 / 64, of live 0.58 / 0.28 / 0.49). "live" is cheaper for
    "exact" (no second pass: about 0.65x the time of a frozen Jacobian-norm step on a CPU VGG-4), except
    that "frozen" "exact" without ``create_graph`` needs no second pass either when the model is piecewise
    linear with fused BatchNorms (:class:`fastjac.ops.FrozenBackward`: the same rows from the clean pass).
    ``batch_norm_stats`` (from :func:`fastjac.record_batch_norm_stats` around the caller's own clean
    forward) makes *every* pass of this call a frozen extra pass: nothing is updated here.
    Extra passes replay the random-number state of the clean pass, so dropout masks are the same.

    ``vectorize=True`` ("jvp" / "finite_difference"): all S probes (and both difference signs) in one pass
    over an S x N (2 S x N) batch instead of one pass each: faster for small models or many probes, S
    (2 S) times the activation memory. Same values for per-sample models (BatchNorm is per-sample in
    the frozen extra passes); random layers (dropout) then draw masks for the larger batch, not the clean
    pass's.
    """
    _check_choice(mode, "mode", MODES)
    _check_choice(estimator, "estimator", ESTIMATORS)
    _check_choice(output, "output", OUTPUTS)
    _check_choice(probe, "probe", PROBES)
    _check_choice(batch_norm, "batch_norm", BATCH_NORM)
    if not callable(model):
        raise TypeError(f"fastjac.input_jacobian: model must be a torch.nn.Module or callable, got {type(model).__name__}")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise TypeError("fastjac.input_jacobian: x must be a floating-point tensor of shape N x (input shape)")
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ValueError(f"fastjac.input_jacobian: samples must be a positive int, got {samples!r}")
    if not (isinstance(sigma, (int, float)) and sigma > 0):
        raise ValueError(f"fastjac.input_jacobian: sigma must be a positive float, got {sigma!r}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"fastjac.input_jacobian: temperature must be a positive float, got {temperature!r}")
    if mode != "target" and target is not None:
        raise ValueError(f"fastjac.input_jacobian: target is only used with mode='target', got a target with mode={mode!r}")
    if mode == "target" and target is None:
        raise ValueError("fastjac.input_jacobian: mode='target' needs target (a LongTensor of N class indices)")
    if probes is not None and estimator == "exact":
        raise ValueError("fastjac.input_jacobian: probes (input-space) are only used by estimator='jvp' or 'finite_difference'")
    if vectorize and estimator == "exact":
        raise ValueError("fastjac.input_jacobian: vectorize=True is only used by estimator='jvp' or 'finite_difference'")
    if output_probes is not None and mode != "projection":
        raise ValueError("fastjac.input_jacobian: output_probes are only used with mode='projection'")
    if batch_norm_stats is not None and not isinstance(batch_norm_stats, BatchNormStats):
        raise TypeError("fastjac.input_jacobian: batch_norm_stats must come from fastjac.record_batch_norm_stats")

    stats = batch_norm_stats
    if stats is not None:
        has_batch_stats = bool(stats)
    else:
        has_batch_stats = isinstance(model, nn.Module) and bool(BatchNormStats(model))
    if batch_norm == "live" and stats is not None:
        raise ValueError("fastjac.input_jacobian: batch_norm='live' cannot be combined with batch_norm_stats")
    if batch_norm == "live" and estimator != "exact" and has_batch_stats:
        raise ValueError(
            f"fastjac.input_jacobian: batch_norm='live' is only defined for estimator='exact'; {estimator!r} runs extra "
            "passes, which must use batch_norm='frozen' when the model has BatchNorm layers using batch statistics"
        )
    record = stats is None and has_batch_stats and batch_norm == "frozen"
    runner = _Runner(model, output, float(temperature), stats, x.device, detach_parameters=not create_graph)
    grad_mode = torch.enable_grad() if create_graph else torch.no_grad()

    n = x.shape[0]
    # The exact rows without create_graph come from the clean pass itself when the model allows the frozen
    # backward (fastjac.ops.FrozenBackward: same rows as the extra frozen pass, one forward instead of two).
    switch = FrozenBackward() if (record and estimator == "exact" and not create_graph and isinstance(model, nn.Module)
                                  and why_not_one_pass(model, x) is None) else None
    separate_clean = (record and switch is None) or estimator != "exact"
    x_in = x if (x.requires_grad or estimator != "exact") else x.detach().requires_grad_(True)
    if separate_clean:
        with grad_mode:
            out = runner.clean(x, record)
    else:
        with torch.enable_grad(), switch.recording() if switch else contextlib.nullcontext():
            jac_out = runner.clean(x_in, record=False)
        out = jac_out

    k = out.shape[1]
    if mode == "target":
        target = _check_target(target, n, k)
    elif mode == "top":
        target = out.detach().argmax(1)
    v = None
    if mode == "projection":
        _check_probes(output_probes, "output_probes", (n, samples, k))
        v = output_probes if output_probes is not None else _draw(probe, (n, samples, k), out, generator)

    if estimator == "exact":
        if separate_clean:
            with torch.enable_grad():
                jac_out = runner.extra(x_in)
        with switch.frozen() if switch else contextlib.nullcontext():
            jacobian = _exact(x_in, jac_out, mode, target, v, create_graph)
        z, kind = None, "rows"
    else:
        shape = (n, samples, *x.shape[1:])
        _check_probes(probes, "probes", shape)
        z = probes if probes is not None else _draw(probe, shape, x, generator)
        with grad_mode:
            jacobian = _directional(runner, x, z, mode, target, v, estimator, float(sigma), bool(vectorize))
        kind = "directional"
    if not create_graph:
        out, jacobian = out.detach(), jacobian.detach()
    return InputJacobian(out, jacobian, target, z, v, kind)
