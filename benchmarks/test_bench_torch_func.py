"""``torch.func`` transforms of a converted model vs the unconverted one (:mod:`benchmarks.torch_func_cost`, which the
report also runs with its target): ``jacrev`` of the logits and per-sample gradients, eval mode; each group compares
``torch`` (unconverted) with ``fastjac`` (converted) for one model and transform."""
import pytest

from .conftest import rounds
from .torch_func_cost import MODELS, TRANSFORMS, _models, workload


@pytest.fixture(scope="module", params=MODELS, ids=[m[0] for m in MODELS])
def models(request):
    name, spec, shape = request.param
    return name, _models(spec), shape


@pytest.mark.parametrize("impl", ["torch", "fastjac"])
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_torch_func_transform(benchmark, models, transform, impl):
    name, built, shape = models
    benchmark.group = f"torch.func {transform} {name} {'x'.join(map(str, shape))}"
    run = workload(built[impl], transform, shape)
    out = benchmark.pedantic(run, rounds=rounds(3), warmup_rounds=1, iterations=1)
    assert out is not None
