"""``torch.library.opcheck`` on the compiled kernel ops (schema, fake tensors, dispatch)."""
import pytest
import torch

import fastjac

pytestmark = pytest.mark.skipif(not fastjac.backends()["cpu"], reason="fastjac._C is not built")


def _cases():
    if not fastjac.backends()["cpu"]:
        return []
    k = torch.ops.fastjac
    x, g = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    _, mask = k.relu_fwd(x)
    cases = [
        ("relu_fwd", (x,)),
        ("relu_bwd", (g, mask)),
        ("softplus_fwd", (x, 2.0, 3.0)),
        ("softplus_bwd", (g, x, 2.0, 3.0)),
        ("softplus_dbwd", (torch.randn_like(x), g, x, 2.0, 3.0)),
    ]
    for training in (True, False):
        for relu in (False, True):
            rm, rv = torch.zeros(4), torch.ones(4)
            _, mean, invstd = k.bn_fwd(x, w, b, rm.clone(), rv.clone(), training, 0.1, 1e-5, relu)
            tail = (x, mean, invstd, w, b, training, relu)
            cases += [
                ("bn_fwd", (x, w, b, rm, rv, training, 0.1, 1e-5, relu)),
                ("bn_bwd", (g, *tail)),
                ("bn_dbwd", (torch.randn_like(x), torch.randn(4), torch.randn(4), g, *tail)),
                ("bn_dbwd", (None, None, torch.randn(4), g, *tail)),
                ("bn_jvp", (torch.randn_like(x), torch.randn(4), None, *tail)),
                ("bn_jvp", (None, None, torch.randn(4), x, mean, invstd, None, None, training, relu)),
            ]
    xc, wc = torch.randn(2, 3, 6, 5), torch.randn(4, 3, 3, 2)
    for stride, padding, dilation in (([1, 1], [1, 0], [1, 1]), ([2, 1], [0, 1], [1, 2])):
        geometry = (stride, padding, dilation, 1)
        yc = k.conv_fwd(xc, wc, None, *geometry)
        cases += [
            ("conv_fwd", (xc, wc, torch.randn(4), *geometry)),
            ("conv_fwd", (xc, wc, None, *geometry)),
            ("conv_bwd_input", (torch.randn_like(yc), xc, wc, *geometry)),
        ]
    return cases


@pytest.mark.parametrize("name,args", _cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_kernel_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.fastjac, name).default, args)
