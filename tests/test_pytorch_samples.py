"""PyTorch's own sample inputs for the ops fastjac replaces, on every fastjac backend (issue 16).

The samples are PyTorch's test databases', taken as they are: the OpInfos of ``op_db``
(``torch.testing._internal.common_methods_invocations``) for ``nn.functional.relu``, ``nn.functional.softplus`` and
``nn.functional.batch_norm`` (every variant, e.g. the CUDA-only ``without_cudnn``, on the devices its OpInfo names),
and the ModuleInfos of ``module_db`` (``common_modules``) for ``nn.BatchNorm1d/2d/3d`` (train and eval),
``nn.ReLU`` and ``nn.Softplus``. Each sample runs through fastjac's equivalent (``fastjac.ops.*`` with the
``torch.nn.functional`` arguments mapped by name, or the module after ``fastjac.convert``) and through PyTorch, in
float64 and float32, on every path of ``_op_cases.op_paths``: ``reference``, ``cpu`` by its C++ chain and by its
Python chain, ``triton`` (interpreted on CPU tensors without a GPU) and, with a GPU, ``cuda``. Compared with PyTorch:

- the value, NaN exactly where PyTorch has NaN (all comparisons);
- first derivatives (VJP with a random cotangent w.r.t. every input that requires grad: x, weight, bias);
- second derivatives (VJP of <first, v> w.r.t. those inputs and the cotangent);
- in float64, third derivatives (VJP of <second, w>). For batch norm PyTorch's own third derivative is not used:
  torch >= 2.12 raises "batch_norm does not support 3rd+ order derivatives" in training mode, and torch 2.11 returns
  a wrong one there (it fails gradcheck; benchmarks/RESULTS.md, stop 26). So every batch-norm case checks fastjac's
  third derivative in a random direction d, <third, d>, against central differences of PyTorch's second-order
  contraction;
- forward mode (dual tensors, the module's parameters through ``torch.func.functional_call``): value and tangent;
- the running statistics (every buffer of a module, ``num_batches_tracked`` too) after the call and all its
  derivatives: updated exactly once, as PyTorch's.

Tolerances per dtype in TOL; what fastjac deliberately does not support, and what becomes of such samples, in
UNSUPPORTED. PyTorch's test databases import ``expecttest`` (the ``dev`` extra) and take ~3 s to import.
"""
import inspect
from dataclasses import dataclass

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import fastjac
from _op_cases import OpPath, op_paths

_FLAGS_FROZEN = torch.backends.flags_frozen()
pytest.importorskip("expecttest", reason="PyTorch's OpInfo / ModuleInfo databases import expecttest (the dev extra)")
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402 (imported once: ~3 s)
from torch.testing._internal.common_modules import module_db  # noqa: E402

if not _FLAGS_FROZEN:  # importing them froze torch.backends' flags for the whole session (common_utils calls
    # torch.backends.disable_global_flags()): thaw them for the rest of the suite
    torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True

FLOATS = [torch.float64, torch.float32]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=3e-5, atol=3e-5)}
FD_STEP, FD_TOL = 1e-6, dict(rtol=1e-6, atol=1e-7)  # third order against central differences, float64


def _batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    return fastjac.ops.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


# OpInfo name -> fastjac's op, with F's parameters (names, order and defaults: test_fastjac_ops_take_f_arguments).
OPS = {
    "nn.functional.relu": lambda input, inplace=False: fastjac.ops.relu(input),
    "nn.functional.softplus": lambda input, beta=1.0, threshold=20.0: fastjac.ops.softplus(input, beta, threshold),
    "nn.functional.batch_norm": _batch_norm,
}
MODULES = [torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.ReLU, torch.nn.Softplus]

# What fastjac deliberately does not do, and what becomes of PyTorch's samples that ask for it.
UNSUPPORTED = {
    "non-float dtype": "fastjac's ops take floating tensors only (TypeError; test_non_float_samples_are_refused); "
                       "the OpInfos' integer dtypes are not collected in the parity tests",
    "float16 / bfloat16": "not collected here: half inputs are covered by tests/test_ops_edge_cases.py (tangent "
                          "dtypes) and the kernel tests, at half tolerances",
    "inplace=True": "fastjac's ops are functional (fastjac.nn.ReLU keeps the flag for repr only): a sample with "
                    "inplace=True is skipped with this reason",
}


def _skip_reason(inplace):
    return UNSUPPORTED["inplace=True"] if inplace is True else None


def _fresh(v, device):
    """A leaf copy of a sample's tensor on ``device`` (so every side and call starts from the sample's state)."""
    if not isinstance(v, torch.Tensor):
        return v
    return v.detach().clone().to(device).requires_grad_(v.requires_grad)


@dataclass
class Call:
    fn: object  # fn(*inputs) -> output
    inputs: list  # the floating tensors that require grad, x first
    state: list  # tensors the call may update in place: running statistics, module buffers


@dataclass
class OpCase:
    op: object  # an OpInfo
    index: int
    sample: object  # a SampleInput on the CPU
    dtype: torch.dtype

    def supported_on(self, device):
        return self.op.supports_dtype(self.dtype, torch.device(device).type)

    @property
    def batch_norm(self):
        return "batch_norm" in self.op.name

    def skip_reason(self):
        return _skip_reason(self.arguments().get("inplace"))

    def arguments(self):
        """The sample's arguments by F's parameter names, defaults filled in."""
        s = self.sample
        bound = inspect.signature(OPS[self.op.name]).bind(s.input, *s.args, **s.kwargs)
        bound.apply_defaults()
        return bound.arguments

    def build(self, side, device):
        arguments = {k: _fresh(v, device) for k, v in self.arguments().items()}
        values = list(arguments.values())
        slots = [i for i, v in enumerate(values) if isinstance(v, torch.Tensor) and v.requires_grad]
        fn = OPS[self.op.name] if side == "fastjac" else self.op.op

        def call(*inputs):
            full = list(values)
            for i, t in zip(slots, inputs):
                full[i] = t
            with torch.backends.cudnn.flags(enabled=self.op.variant_test_name != "without_cudnn"):  # as its OpInfo
                return fn(*full)

        state = [arguments[k] for k in ("running_mean", "running_var") if isinstance(arguments.get(k), torch.Tensor)]
        return Call(call, [values[i] for i in slots], state)

    def __str__(self):
        arguments = self.arguments()
        shape = "x".join(map(str, arguments["input"].shape)) or "scalar"
        mode = ("-train" if arguments["training"] else "-eval") if "training" in arguments else ""
        variant = f".{self.op.variant_test_name}" if self.op.variant_test_name else ""
        return f"{self.op.name.split('.')[-1]}{variant}#{self.index}-{shape}{mode}-{str(self.dtype)[6:]}"


@dataclass
class ModuleCase:
    info: object  # a ModuleInfo
    index: int
    sample: object  # a ModuleInput on the CPU
    training: bool
    dtype: torch.dtype

    def supported_on(self, device):
        return True

    @property
    def batch_norm(self):
        return issubclass(self.info.module_cls, torch.nn.modules.batchnorm._BatchNorm)

    def skip_reason(self):
        ctor = self.sample.constructor_input
        return _skip_reason(getattr(self.info.module_cls(*ctor.args, **ctor.kwargs), "inplace", None))

    def build(self, side, device):
        ctor = self.sample.constructor_input
        module = self.info.module_cls(*ctor.args, **ctor.kwargs).to(device=device, dtype=self.dtype)
        module.train(self.training)
        if side == "fastjac":
            module = fastjac.convert(module)
            assert type(module).__module__.startswith("fastjac."), type(module)
        names = [n for n, _ in module.named_parameters()]
        (x,) = [_fresh(v, device) for v in self.sample.forward_input.args]

        def call(x, *params):
            return torch.func.functional_call(module, dict(zip(names, params)), (x,))

        return Call(call, [x, *module.parameters()], list(module.buffers()))

    def __str__(self):
        desc = self.sample.desc or "default"
        mode = ("-train" if self.training else "-eval") if self.info.train_and_eval_differ else ""
        return f"{self.info.module_cls.__name__}#{self.index}-{desc}{mode}-{str(self.dtype)[6:]}"


def _cases():
    with torch.random.fork_rng(devices=[]):  # the samples are drawn from torch's generator: the same every run
        torch.manual_seed(0)
        return _draw_cases()


def _draw_cases():
    cases = []
    for op in op_db:
        if op.name in OPS:
            for dtype in FLOATS:
                samples = op.sample_inputs("cpu", dtype, requires_grad=True)
                cases += [OpCase(op, i, s, dtype) for i, s in enumerate(samples)]
    for info in module_db:
        if info.module_cls in MODULES:
            for dtype in FLOATS:
                for training in (True, False) if info.train_and_eval_differ else (True,):
                    samples = info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True,
                                                      training=training)
                    cases += [ModuleCase(info, i, s, training, dtype) for i, s in enumerate(samples)]
    return cases


CASES = _cases()
PATHS = [OpPath(*p) for p in op_paths()]


def _params(chains=("cpp", "python")):
    return [pytest.param(case, path, id=f"{case}-{path}") for case in CASES for path in PATHS
            if path.chain in chains and case.supported_on(path.device)]


class Probes:
    """Random cotangents, probes and tangents, drawn once by name and shared by fastjac's and PyTorch's side."""

    def __init__(self):
        self.made = {}

    def __call__(self, name, like):
        if name not in self.made:
            self.made[name] = torch.randn(like.shape, dtype=like.dtype, device=like.device)
        return self.made[name]


def _orders(fn, inputs, probe, order):
    """``[y, d1, ..., d<order>]``: y = fn(*inputs), d1 its VJP with the cotangent g w.r.t. ``inputs``, d(k+1) the
    VJP of <dk, probes> w.r.t. ``inputs`` and g (None: no derivative)."""
    y = fn(*inputs)
    g = probe("g", y).requires_grad_()
    out, outputs, cotangents, wrt = [y], [y], [g], list(inputs)
    for k in range(1, order + 1):
        live = [(o, c) for o, c in zip(outputs, cotangents) if o is not None and o.requires_grad]
        d = [None] * len(wrt)
        if live:
            d = torch.autograd.grad([o for o, _ in live], wrt, [c for _, c in live], create_graph=k < order,
                                    allow_unused=True)
        out.append(list(d))
        cotangents = [probe(f"d{k}.{i}", t) for i, t in enumerate(wrt)]
        outputs, wrt = d, [*inputs, g]
    return out


def _dot(ts, probes):
    """sum <t, p> over the present ``ts``, a Python float."""
    return sum((t.double() * p.double()).sum().item() for t, p in zip(ts, probes) if t is not None)


def _close(actual, expected, tol, what):
    if actual is None or expected is None:  # an absent derivative is an exactly-zero one on the other side
        other = expected if actual is None else actual
        assert other is None or torch.count_nonzero(other) == 0, what
        return
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    torch.testing.assert_close(actual.detach().cpu(), expected.detach().cpu(), equal_nan=True,
                               msg=lambda m: f"{what}: {m}", **tol)


def _compare(mine, theirs, tol, what):
    assert len(mine) == len(theirs), what
    for i, (a, b) in enumerate(zip(mine, theirs)):
        _close(a, b, tol, f"{what}[{i}]")


def _third_by_differences(case, device, probe, second_inputs):
    """<PyTorch's third derivative, d> as the central difference of PyTorch's <second derivatives, w> along d."""
    direction = [probe(f"dir.{i}", t) for i, t in enumerate(second_inputs)]
    values = []
    for step in (FD_STEP, -FD_STEP):
        call = case.build("torch", device)  # fresh running statistics: training mode does not read them
        moved = [(t + step * d).detach().requires_grad_() for t, d in zip(second_inputs, direction)]
        shifted = Probes()
        shifted.made = dict(probe.made, g=moved[-1])
        _, _, second = _orders(call.fn, moved[:-1], shifted, 2)
        values.append(_dot(second, [probe(f"d2.{i}", t) for i, t in enumerate(moved)]))
    return (values[0] - values[1]) / (2 * FD_STEP), direction


@pytest.mark.parametrize("case, path", _params())
def test_values_and_derivatives_match_pytorch(case, path):
    """Value, derivatives to second (float32) or third (float64) order and running statistics, against PyTorch."""
    if case.skip_reason():
        pytest.skip(case.skip_reason())
    order, tol = (3 if case.dtype == torch.float64 else 2), TOL[case.dtype]
    probe = Probes()
    mine_call, theirs_call = case.build("fastjac", path.device), case.build("torch", path.device)
    with path():
        mine = _orders(mine_call.fn, mine_call.inputs, probe, order)
    theirs_order = min(order, 2) if case.batch_norm else order  # batch norm's third: central differences (docstring)
    theirs = _orders(theirs_call.fn, theirs_call.inputs, probe, theirs_order) + [None] * (order - theirs_order)
    _close(mine[0], theirs[0], tol, "value")
    for k in range(1, order + 1):
        if theirs[k] is not None:
            _compare(mine[k], theirs[k], tol, f"derivative {k}")
    if theirs[-1] is None:  # PyTorch's third derivative by central differences
        expected, direction = _third_by_differences(case, path.device, probe, [*theirs_call.inputs, probe.made["g"]])
        torch.testing.assert_close(_dot(mine[3], direction), expected, **FD_TOL)
    _compare(mine_call.state, theirs_call.state, tol, "running statistics")


@pytest.mark.parametrize("case, path", _params(chains=("python",)))  # forward mode takes the Python chain only
def test_forward_mode_matches_pytorch(case, path):
    """Dual tensors for every input that requires grad: value, tangent and running statistics, against PyTorch."""
    if case.skip_reason():
        pytest.skip(case.skip_reason())
    probe, results = Probes(), []
    for side in ("fastjac", "torch"):
        call = case.build(side, path.device)
        with fwAD.dual_level(), (path() if side == "fastjac" else torch.enable_grad()):
            duals = [fwAD.make_dual(t.detach(), probe(f"t{i}", t)) for i, t in enumerate(call.inputs)]
            out = fwAD.unpack_dual(call.fn(*duals))
            results.append([out.primal.detach(), out.tangent, *[t.detach().clone() for t in call.state]])
    _compare(*results, TOL[case.dtype], "primal, tangent, running statistics")


def test_fastjac_ops_take_f_arguments():
    """The mapping of OPS is by F's own parameter list: same names, order and defaults."""
    for name, fastjac_op in OPS.items():
        ours = [(p.name, p.default) for p in inspect.signature(fastjac_op).parameters.values()]
        f = getattr(F, name.split(".")[-1])
        try:
            theirs = [(p.name, p.default) for p in inspect.signature(f).parameters.values()]
        except ValueError:  # a builtin (softplus): the signature its docstring opens with
            theirs = f.__doc__.strip().split(" -> ")[0]
            ours = f"{f.__name__}({', '.join(f'{n}={d:g}' if d is not inspect._empty else n for n, d in ours)})"
        assert ours == theirs, name


@pytest.mark.parametrize("op", [op for op in op_db if op.name in OPS and not op.variant_test_name],
                         ids=lambda op: op.name)
def test_non_float_samples_are_refused(op):
    """PyTorch's samples in the OpInfo's integer / bool dtypes: fastjac raises, it never computes something else."""
    dtypes = [d for d in op.supported_dtypes("cpu") if not d.is_floating_point and not d.is_complex]
    for dtype in dtypes:
        for s in op.sample_inputs("cpu", dtype, requires_grad=False):
            with pytest.raises(TypeError, match="floating-point"):
                OPS[op.name](s.input, *s.args, **s.kwargs)
    assert dtypes or op.name != "nn.functional.relu"  # relu's OpInfo has integer dtypes: the test is not empty
