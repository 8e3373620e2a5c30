"""Autograd plumbing shared by every fused op.

Each fused op is a chain of registered ops (``torch.library.custom_op``): forward, backward (the VJP),
double backward. The backward formula of each link calls the next link, so gradient-of-gradient
composes through registered ops. ``torch.library`` has no forward-mode hook, so the user-facing entry
point of each link is an ``autograd.Function`` built here from the same ``setup_context``/``backward``
plus a ``jvp`` (the only thing registration cannot express).

Beyond the kernels' own orders, :func:`reference_vjp` / :func:`reference_jvp` differentiate the
pure-PyTorch reference (:mod:`fastjac.reference`) instead: correct to any order, not fused.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def differentiable(op, *, setup_context: Callable, backward: Callable, jvp: Callable) -> Callable:
    """Register ``backward`` on the custom op ``op`` and return an ``apply`` that also supports ``jvp``.

    ``setup_context(ctx, inputs, output)`` must save what ``backward`` and ``jvp`` read with
    ``ctx.save_for_backward`` (it is also used for forward mode).
    """

    def _setup(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        setup_context(ctx, inputs, output)

    op.register_autograd(backward, setup_context=_setup)

    def forward(*args):
        return op(*args)

    def setup_both(ctx, inputs, output):
        _setup(ctx, inputs, output)
        ctx.save_for_forward(*ctx.to_save)

    name = op._name.split("::")[-1]
    fn = type(
        f"{name}_function",
        (torch.autograd.Function,),
        {
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_both),
            "backward": staticmethod(backward),
            "jvp": staticmethod(jvp),
        },
    )
    return fn.apply


def _leaf_like(t: torch.Tensor | None, wanted: bool):
    """Use ``t`` in a local graph: as is when it already carries one, else as a fresh leaf."""
    if t is None or not wanted:
        return t
    return t if t.requires_grad else t.detach().requires_grad_()


def reference_vjp(fn: Callable, inputs: Sequence, needs_grad: Sequence[bool], grads: Sequence):
    """VJP of ``fn(*inputs)`` (a reference kernel) for ``grads``, one entry per input (None if unused).

    When called inside a backward with ``create_graph=True`` the result stays differentiable.
    """
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        args = [_leaf_like(a, w) if isinstance(a, torch.Tensor) else a for a, w in zip(inputs, needs_grad)]
        outs = fn(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        wrt = [a for a, w in zip(args, needs_grad) if w and isinstance(a, torch.Tensor)]
        if not pairs or not wrt:
            return [None] * len(inputs)
        got = iter(
            torch.autograd.grad(
                [o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True, create_graph=create_graph
            )
        )
    return [next(got) if w and isinstance(a, torch.Tensor) else None for a, w in zip(inputs, needs_grad)]


def reference_jvp(fn: Callable, inputs: Sequence, tangents: Sequence):
    """JVP of ``fn(*inputs)`` by the double-VJP identity ``J t = d/dv (v^T J) t`` (no forward-mode needed)."""
    with torch.enable_grad():
        wanted = [isinstance(a, torch.Tensor) and t is not None for a, t in zip(inputs, tangents)]
        args = [a.detach().requires_grad_() if w else a for a, w in zip(inputs, wanted)]
        outs = fn(*args)
        single = not isinstance(outs, tuple)
        outs = (outs,) if single else outs
        live = [o for o in outs if o.requires_grad]
        dummies = [torch.zeros_like(o, requires_grad=True) for o in live]
        wrt = [a for a, w in zip(args, wanted) if w]
        vjps = torch.autograd.grad(live, wrt, dummies, create_graph=True, allow_unused=True)
        pairs = [(v, t) for v, t in zip(vjps, [t for t, w in zip(tangents, wanted) if w]) if v is not None]
        if pairs:
            jvps = torch.autograd.grad([v for v, _ in pairs], dummies, [t for _, t in pairs], allow_unused=True)
        else:
            jvps = [None] * len(dummies)
    it = iter(jvps)
    result = tuple((next(it) if o.requires_grad else None) for o in outs)
    result = tuple(torch.zeros_like(o) if r is None else r.detach() for o, r in zip(outs, result))
    return result[0] if single else result


def save_inputs(ctx, inputs, output) -> None:
    """``setup_context`` that saves every input: tensor-or-None ones with ``save_for_backward`` (they must
    come first in the signature), the rest (floats, bools) as ``ctx.scalars``. ``saved_inputs(ctx)``
    gives them back in order."""
    split = next((i for i, a in enumerate(inputs) if not (a is None or isinstance(a, torch.Tensor))), len(inputs))
    ctx.save_for_backward(*inputs[:split])
    ctx.scalars = tuple(inputs[split:])


def saved_inputs(ctx) -> tuple:
    return (*ctx.saved_tensors, *ctx.scalars)


def reference_links(fn: Callable):
    """``(backward, jvp)`` formulas for a link whose derivatives come from the reference kernel ``fn``;
    use with :func:`save_inputs`."""

    def backward(ctx, *grads):
        return tuple(reference_vjp(fn, saved_inputs(ctx), ctx.needs_input_grad, grads))

    def jvp(ctx, *tangents):
        return reference_jvp(fn, saved_inputs(ctx), tangents)

    return backward, jvp
