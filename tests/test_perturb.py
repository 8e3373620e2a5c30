"""Counter-based perturbations (csrc/common/philox.h, fastjac/ops/perturb.py): the Philox stream against the
Random123 known answers, the CPU kernels against the PyTorch reference (integer words bit-exact, floats within
rounding), reproducibility, independence of streams, noise regenerated rather than saved, derivatives, opcheck."""
import math

import pytest
import torch

import fastjac
from fastjac.ops import noise, noise_dot, perturb
from fastjac.ops.perturb import philox_words
from fastjac.reference import perturb as ref
from _saved import packed_tensors

compiled = pytest.mark.skipif(not fastjac.backends()["cpu"], reason="fastjac._C is not built")

# Random123 kat_vectors for philox4x32_10: (counter, key, expected words)
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
# (seed, offset, numel): unaligned offsets and lengths, several Philox blocks, more than one kernel chunk, a
# negative seed (its 64 bits are the key) and a 2**62-sized offset (counter words above 32 bits)
STREAMS = [(0, 0, 8), (-1, 3, 1001), (2**40 + 17, 12345, 4097), (123, 5, 7), (7, 2**62 - 100, 64)]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_reference_philox_matches_random123_known_answers(counter, key, expected):
    words = ref.philox4x32_10(*(torch.tensor([c], dtype=torch.int64) for c in counter), *key)
    assert tuple(int(w) for w in words) == expected


def test_stream_layout_block_words(backend):
    """Element e owns word e & 3 of the Philox block of counter (lo32(e >> 2), hi32(e >> 2), 0, 0) under the key
    (lo32(seed), hi32(seed))."""
    assert tuple(philox_words(torch.empty(4), seed=0).tolist()) == KAT[0][2]
    seed, block = 0x299F31D0A4093822, 0x123456789  # a block index above 32 bits
    counter = (torch.tensor([c]) for c in (block & 0xFFFFFFFF, block >> 32, 0, 0))
    expected = [int(t) for t in ref.philox4x32_10(*counter, 0xA4093822, 0x299F31D0)]
    assert philox_words(torch.empty(6), seed=seed, offset=4 * block - 1).tolist()[1:5] == expected


@compiled
@pytest.mark.parametrize("seed,offset,numel", STREAMS)
def test_cpu_words_bit_exact(seed, offset, numel):
    like = torch.empty(numel)
    assert torch.equal(torch.ops.fastjac.philox_words(like, seed, offset), ref.philox_words(like, seed, offset))


@compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("distribution", [0, 1], ids=["gaussian", "rademacher"])
@pytest.mark.parametrize("seed,offset,numel", STREAMS)
def test_cpu_kernels_match_reference(seed, offset, numel, distribution, dtype):
    k = torch.ops.fastjac
    x = torch.randn(numel, dtype=torch.float64).to(dtype)
    rows = 7 if numel % 7 == 0 else 1
    x = x.view(rows, -1)
    for sigma in (torch.tensor(0.7), torch.linspace(0.5, 2.0, rows, dtype=torch.float64)):
        got, want = k.perturb_fwd(x, sigma, seed, offset, distribution), ref.perturb_fwd(x, sigma, seed, offset, distribution)
        if distribution == 1 or dtype in (torch.float16, torch.bfloat16):
            # Rademacher: x +- sigma in the compute type, then one rounding: identical up to fma contraction
            tol = dict(rtol=0, atol=0) if dtype in (torch.float32, torch.float64) else None
            torch.testing.assert_close(got, want, **(tol or {}))
        else:  # Box-Muller in float / double: libm vs PyTorch log, sin, cos differ by an ulp or two
            eps = torch.finfo(dtype).eps
            torch.testing.assert_close(got, want, rtol=8 * eps, atol=64 * eps)
    g = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    got, want = k.noise_row_dot(g, seed, offset, distribution), ref.noise_row_dot(g, seed, offset, distribution)
    assert got.dtype == want.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    eps = torch.finfo(got.dtype).eps
    torch.testing.assert_close(got, want, rtol=0, atol=64 * eps * math.sqrt(x[0].numel()) * 6)


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_reproducible_and_element_addressable(backend, distribution):
    """Same (seed, offset) -> identical noise; noise at offset k equals elements k.. of the stream at offset 0
    (no dependence on where a tensor starts or how it is chunked); another seed -> different noise."""
    like = torch.empty(5000)
    a = noise(like, seed=11, offset=0, distribution=distribution)
    assert torch.equal(a, noise(like, seed=11, offset=0, distribution=distribution))
    for k in (1, 2, 3, 5, 1029):
        part = noise(torch.empty(300), seed=11, offset=k, distribution=distribution)
        assert torch.equal(part, a[k:k + 300]), k
    assert not torch.equal(a, noise(like, seed=12, offset=0, distribution=distribution))


def _moments_ok(z, mean, var):
    n = z.numel()
    # 5-sigma bounds of the sample mean and variance under the assumed law (4th moment: 3 var^2 Gaussian,
    # var^2 = 1 Rademacher (constant square) -> the variance is then checked exactly below)
    assert abs(z.mean().item() - mean) < 5 * math.sqrt(var / n)
    return z.var().item()


def test_gaussian_and_rademacher_moments(backend):
    n = 1 << 16
    z = noise(torch.empty(n, dtype=torch.float64), seed=2024, distribution="gaussian")
    s2 = _moments_ok(z, 0.0, 1.0)
    assert abs(s2 - 1.0) < 5 * math.sqrt(2.0 / n)  # Var(z^2) = 2 for N(0, 1)
    assert abs((z**4).mean().item() - 3.0) < 5 * math.sqrt(96.0 / n)  # E z^4 = 3, Var(z^4) = 105 - 9
    assert z.abs().max().item() <= math.sqrt(48 * math.log(2)) + 1e-12  # 24-bit uniforms: documented truncation
    # P(|z| > 1.96) = 0.05
    frac = (z.abs() > 1.959964).double().mean().item()
    assert abs(frac - 0.05) < 5 * math.sqrt(0.05 * 0.95 / n)
    r = noise(torch.empty(n, dtype=torch.float64), seed=2024, distribution="rademacher")
    assert set(r.unique().tolist()) == {-1.0, 1.0}
    _moments_ok(r, 0.0, 1.0)


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_offsets_and_seeds_give_independent_streams(backend, distribution):
    """Correlations between disjoint offset ranges, between seeds, and between neighbouring elements (incl.
    the two halves of a Box-Muller pair) are within 5 / sqrt(n) of zero (their standard deviation is 1/sqrt(n))."""
    n = 1 << 15
    like = torch.empty(n, dtype=torch.float64)
    a = noise(like, seed=5, offset=0, distribution=distribution)
    pairs = {
        "next offset range": noise(like, seed=5, offset=n, distribution=distribution),
        "next seed": noise(like, seed=6, offset=0, distribution=distribution),
    }
    bound = 5 / math.sqrt(n)
    for name, b in pairs.items():
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < bound, name
    assert abs(torch.corrcoef(torch.stack([a[0::2], a[1::2]]))[0, 1].item()) < bound * math.sqrt(2)
    assert abs(torch.corrcoef(torch.stack([a[1:-1:2], a[2::2]]))[0, 1].item()) < bound * math.sqrt(2)


def test_words_uniform_bits(backend):
    n = 1 << 14
    w = philox_words(torch.empty(n), seed=99, offset=3)
    assert int(w.min()) >= 0 and int(w.max()) < 2**32
    for bit in (0, 15, 31):
        frac = ((w >> bit) & 1).double().mean().item()
        assert abs(frac - 0.5) < 5 * 0.5 / math.sqrt(n), bit


def test_noise_is_regenerated_not_saved(backend):
    x = torch.randn(64, 32, requires_grad=True)
    sigma = torch.tensor(0.3, requires_grad=True)
    packed, y = packed_tensors(lambda: perturb(x, sigma, seed=1).sum())
    assert not any(t.numel() > 1 for t in packed), [tuple(t.shape) for t in packed]
    y.backward()
    z = noise(x.detach(), seed=1)
    torch.testing.assert_close(x.grad, torch.ones_like(x))
    torch.testing.assert_close(sigma.grad, z.double().sum().to(sigma.dtype), rtol=1e-5, atol=1e-4)
    # the plain-PyTorch equivalent has to keep the noise for sigma's gradient
    packed_torch, _ = packed_tensors(lambda: (x + sigma * z).sum())
    assert any(t.shape == x.shape for t in packed_torch)
    g = torch.randn(64, 32, requires_grad=True)
    packed, d = packed_tensors(lambda: noise_dot(g, seed=1, offset=7).sum())
    assert not packed
    d.backward()
    torch.testing.assert_close(g.grad, noise(g.detach(), seed=1, offset=7))


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_gradcheck(backend, distribution):
    x = torch.randn(3, 4, 2, dtype=torch.float64, requires_grad=True)
    for sigma in (torch.tensor(0.4, dtype=torch.float64), torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)):
        sigma.requires_grad_()
        f = lambda x, s: perturb(x, s, seed=9, offset=3, distribution=distribution)  # noqa: E731
        assert torch.autograd.gradcheck(f, (x, sigma), check_forward_ad=True)
        assert torch.autograd.gradgradcheck(f, (x, sigma))
    g = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    h = lambda g: noise_dot(g, seed=9, offset=3, distribution=distribution)  # noqa: E731
    assert torch.autograd.gradcheck(h, (g,), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(h, (g,))


def test_values_are_x_plus_sigma_noise(backend):
    x = torch.randn(4, 6, dtype=torch.float64)
    sigma = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    z = noise(x, seed=3, offset=10).view(4, 6)
    torch.testing.assert_close(perturb(x, sigma, seed=3, offset=10), x + sigma[:, None] * z, rtol=0, atol=1e-15)
    torch.testing.assert_close(noise_dot(x, seed=3, offset=10), (x * z).sum(1), rtol=1e-14, atol=1e-14)
    assert torch.equal(perturb(x, 0.0, seed=3), x)
    # a 2**64-range seed is the same 64 bits as its negative int64 form
    assert torch.equal(noise(x, seed=2**64 - 5), noise(x, seed=-5))


def _opcheck_cases():
    x, s = torch.randn(3, 5), torch.tensor([0.2, 0.3, 0.4])
    cases = [
        (torch.ops.fastjac.perturb.default, (x, s, 7, 3, 0)),
        (torch.ops.fastjac.perturb.default, (x, s[0], -2, 0, 1)),
        (torch.ops.fastjac.noise_dot.default, (x, 7, 3, 0)),
    ]
    if fastjac.backends()["cpu"]:
        cases += [
            (torch.ops.fastjac.perturb_fwd.default, (x, s, 7, 3, 0)),
            (torch.ops.fastjac.perturb_fwd.default, (x, s[0], 7, 3, 1)),
            (torch.ops.fastjac.noise_row_dot.default, (x, 7, 3, 1)),
            (torch.ops.fastjac.philox_words.default, (x, 7, 3)),
        ]
    return cases


@pytest.mark.parametrize("op,args", _opcheck_cases(), ids=lambda v: str(v) if not isinstance(v, tuple) else "")
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


def test_bad_arguments_raise_named_errors():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="distribution"):
        perturb(x, 0.1, seed=1, distribution="uniform")
    with pytest.raises(ValueError, match="offset"):
        perturb(x, 0.1, seed=1, offset=-1)
    with pytest.raises(ValueError, match="seed"):
        perturb(x, 0.1, seed=1.5)
    with pytest.raises(ValueError, match="sigma"):
        perturb(x, torch.ones(4), seed=1)
    with pytest.raises(TypeError, match="x"):
        perturb(torch.ones(3, dtype=torch.int64), 0.1, seed=1)
    with pytest.raises(ValueError, match="distribution"):
        noise_dot(x, seed=1, distribution="normal")


def _cuda_kernels_built():
    return torch.cuda.is_available() and fastjac.backends()["cpu"] and torch._C._dispatch_has_kernel_for_dispatch_key(
        "fastjac::perturb_fwd", "CUDA"
    )


def _check_cuda_kernels(k, device, seed, offset, numel, distribution, dtype):
    """The CUDA kernels of the op table ``k`` on ``device`` against the reference."""
    like = torch.empty(numel, device=device)
    assert torch.equal(k.philox_words(like, seed, offset).cpu(), ref.philox_words(like.cpu(), seed, offset))
    rows = 7 if numel % 7 == 0 else 1
    x = torch.randn(rows, numel // rows, dtype=torch.float64).to(dtype)
    sigma = torch.linspace(0.5, 2.0, rows, dtype=torch.float64)
    got = k.perturb_fwd(x.to(device), sigma.to(device), seed, offset, distribution).cpu()
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got, ref.perturb_fwd(x, sigma, seed, offset, distribution), rtol=8 * eps, atol=64 * eps)
    got = k.noise_row_dot(x.to(device), seed, offset, distribution).cpu()
    want = ref.noise_row_dot(x, seed, offset, distribution)
    eps = torch.finfo(want.dtype).eps
    torch.testing.assert_close(got, want, rtol=0, atol=64 * eps * math.sqrt(x[0].numel()) * 6)


@pytest.mark.skipif(not _cuda_kernels_built(), reason="needs a GPU and the CUDA perturbation kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("distribution", [0, 1], ids=["gaussian", "rademacher"])
@pytest.mark.parametrize("seed,offset,numel", STREAMS)
def test_cuda_kernels_match_reference(seed, offset, numel, distribution, dtype):
    _check_cuda_kernels(torch.ops.fastjac, "cuda", seed, offset, numel, distribution, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("distribution", [0, 1], ids=["gaussian", "rademacher"])
@pytest.mark.parametrize("seed,offset,numel", STREAMS)
def test_cuda_kernels_emulated_match_reference(seed, offset, numel, distribution, dtype):
    """The same CUDA kernels run on the CPU by the emulation of tests/_cuda_emulation.py."""
    from _cuda_emulation import ops

    _check_cuda_kernels(ops(), "cpu", seed, offset, numel, distribution, dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_reference_runs_on_cuda_tensors():
    x = torch.randn(5, 301, dtype=torch.float64)
    with fastjac.use_backend("reference"):
        assert torch.equal(philox_words(x.cuda(), seed=4, offset=9).cpu(), ref.philox_words(x, 4, 9))
        got = perturb(x.cuda(), torch.rand(5, dtype=torch.float64).cuda() * 0 + 0.5, seed=4, offset=9).cpu()
    torch.testing.assert_close(got, ref.perturb_fwd(x, torch.tensor(0.5), 4, 9, 0), rtol=1e-14, atol=1e-14)


def test_dispatch_compiled_else_reference():
    """CPU tensors use the C++ kernels when built (the reference when forced); without the extension the
    reference serves everything and yields the same stream."""
    import os
    import subprocess
    import sys

    from fastjac.ops.perturb import kernels

    cpu = torch.device("cpu")
    assert kernels(cpu) is (torch.ops.fastjac if fastjac.backends()["cpu"] else ref)
    with fastjac.use_backend("reference"):
        assert kernels(cpu) is ref
    script = (
        "import sys; sys.modules['fastjac._C'] = None\n"
        "import torch, fastjac\n"
        "from fastjac.ops.perturb import kernels, philox_words\n"
        "from fastjac.reference import perturb as ref\n"
        "assert not fastjac.backends()['cpu'] and kernels(torch.device('cpu')) is ref\n"
        "torch.manual_seed(0); x = torch.randn(3, 5, dtype=torch.float64)\n"
        "print(philox_words(x, 17, 3).tolist())\n"
        "print(float(fastjac.hessian_trace(lambda z: (z ** 4).sum(1), x, 'hutchinson', seed=2)[0]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "FASTJAC_BACKEND"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    words, trace = proc.stdout.strip().splitlines()
    x = torch.empty(3, 5)
    assert words == str(philox_words(x, 17, 3).tolist())
    torch.manual_seed(0)
    xx = torch.randn(3, 5, dtype=torch.float64)
    z = noise(xx, seed=2)
    assert abs(float(trace) - float((12 * xx[0] ** 2 * z[0] ** 2).sum())) < 1e-10


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 4), ()], ids=str)
def test_empty_and_zero_dim_tensors(backend, shape):
    """Empty tensors give empty results; a 0-dim tensor is one row of one element (stream element offset)."""
    x = torch.ones(shape, dtype=torch.float64, requires_grad=True)
    y, d = perturb(x, 0.5, seed=1, offset=3), noise_dot(x, seed=1, offset=3)
    assert y.shape == x.shape and d.shape == ((1,) if x.dim() == 0 else (x.shape[0],))
    (y.sum() + d.sum()).backward()
    z = ref.noise(x.numel(), 1, 3, 0, torch.float64, "cpu").view(x.shape)
    torch.testing.assert_close(y.detach(), 1 + 0.5 * z)
    torch.testing.assert_close(x.grad, 1 + z)
