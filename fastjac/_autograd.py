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

import inspect
from typing import Callable, Sequence

import torch


_VARARGS = inspect.Signature([inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL)])


def direct(op) -> Callable:
    """Call the custom op ``op``'s Python implementation without the dispatcher round trip, when that is safe.

    Inside an ``autograd.Function.forward`` autograd is already below us, so in plain eager mode going through
    the custom op's dispatch (autograd key -> redispatch -> backend implementation, ~40 µs on CPU per call,
    measured) buys nothing. Whenever something may be tracing — ``torch.compile``, a dispatch mode on the stack
    (FakeTensorMode, AOT autograd's proxy mode, opcheck), or a tensor subclass among the arguments — the op
    itself is called, so traced graphs hold the registered op with its fake kernel as before.
    """
    impl = getattr(op, "_init_fn", None)  # torch.library.CustomOpDef keeps the decorated function here
    if impl is None:
        return op

    def run(*args):
        if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
                or any(isinstance(a, torch.Tensor) and type(a) is not torch.Tensor for a in args)):
            return op(*args)
        return impl(*args)

    return run


def differentiable(
    op, *, setup_context: Callable, backward: Callable, jvp: Callable, vmap: Callable,
    forward: Callable | None = None,
) -> Callable:
    """Register ``backward`` on the custom op ``op`` and return an ``apply`` that also supports ``jvp``.

    ``setup_context(ctx, inputs, output)`` must save what ``backward`` and ``jvp`` read with
    ``ctx.save_for_backward`` (it is also used for forward mode). ``forward(*args)``, default ``op``,
    runs below autograd and functorch transforms, on plain tensors. While ``torch.compile`` traces, the
    returned function calls ``forward`` / the op directly (autograd through the registration), so a converted
    model compiles into one graph (``fullgraph=True``; tests/test_cpp_chain.py).

    ``vmap(apply, info, in_dims, *args)`` is the link's batching rule (:mod:`fastjac.ops._vmap`): it gets the
    physical tensors of one ``torch.vmap`` level and calls ``apply`` (this link again) on a reshaped problem.
    """

    def _setup(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        setup_context(ctx, inputs, output)

    op.register_autograd(backward, setup_context=_setup)

    run = forward or direct(op)

    def forward(*args):
        return run(*args)

    # autograd.Function.apply binds the arguments against inspect.signature(forward) on every call; a
    # precomputed signature halves the Python cost of a fused-op call (measured: ~100 -> ~50 µs on CPU).
    forward.__signature__ = _VARARGS

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
            "vmap": staticmethod(lambda info, in_dims, *args: vmap(fn.apply, info, in_dims, *args)),
        },
    )
    apply = fn.apply

    def call(*args):
        # Under torch.compile, the registered op itself (its autograd registered above): Dynamo traces it into one
        # graph, where it cannot trace an autograd.Function with a custom jvp (a graph break). Forward mode is not
        # traced by torch.compile, so nothing is lost.
        if torch.compiler.is_compiling():
            return run(*args)
        return apply(*args)

    return call


def _partial(fn: Callable, inputs: Sequence, chosen: Sequence[bool]):
    """``fn`` as a function of the chosen inputs only (the others are bound as constants)."""

    def bound(*picked):
        it = iter(picked)
        return fn(*[next(it) if c else a for a, c in zip(inputs, chosen)])

    return bound, [a for a, c in zip(inputs, chosen) if c]


def reference_vjp(fn: Callable, inputs: Sequence, needs_grad: Sequence[bool], grads: Sequence):
    """VJP of ``fn(*inputs)`` (a reference kernel) for ``grads``, one result per input (None if unused).

    Uses ``torch.func.vjp``, so it nests under torch.func transforms, and the result stays differentiable
    when called inside a backward with ``create_graph=True``.
    """
    chosen = [isinstance(a, torch.Tensor) and bool(w) for a, w in zip(inputs, needs_grad)]
    if not any(chosen):
        return [None] * len(inputs)
    bound, primals = _partial(fn, inputs, chosen)
    outs, pullback = torch.func.vjp(bound, *primals)
    single = not isinstance(outs, tuple)
    cotangents = [torch.zeros_like(o) if g is None else g for o, g in zip((outs,) if single else outs, grads)]
    it = iter(pullback(cotangents[0] if single else tuple(cotangents)))
    return [next(it) if c else None for c in chosen]


def reference_jvp(fn: Callable, inputs: Sequence, tangents: Sequence):
    """JVP of ``fn(*inputs)`` (a reference kernel); None tangents count as zero.

    Computed as the VJP of the (linear) VJP, ``J t = d/dv (v^T J) . t``, with ``torch.func.vjp``: it
    nests both under torch.func transforms and inside ``torch.autograd.forward_ad`` (which cannot nest
    a second forward level).
    """
    chosen = [isinstance(a, torch.Tensor) and t is not None for a, t in zip(inputs, tangents)]
    bound, primals = _partial(fn, inputs, chosen)
    outs, pullback = torch.func.vjp(bound, *primals)
    single = not isinstance(outs, tuple)
    outs_t = (outs,) if single else outs
    if not primals:
        zeros = tuple(torch.zeros_like(o) for o in outs_t)
        return zeros[0] if single else zeros
    cotangent = tuple(torch.zeros_like(o) for o in outs_t)
    _, pullback_of_pullback = torch.func.vjp(lambda *v: pullback(v[0] if single else v), *cotangent)
    result = pullback_of_pullback(tuple(t for t, c in zip(tangents, chosen) if c))
    return result[0] if single else tuple(result)


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
