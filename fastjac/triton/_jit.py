"""@triton.jit helpers shared by every Triton kernel of fastjac (csrc/KERNELS.md conventions).

Offsets are 64-bit: program ids are cast to int64 before they are multiplied by a block size. BatchNorm inputs
are ``N x C x S`` (S = prod(spatial)) row-major, so element ``(n, c, s)`` is at ``n C S + c S + s``. The fused
ReLU's mask is recomputed as ``z = a x + c`` with one fused multiply-add (``bn_z``), like ``csrc/common/
batch_norm.h``, so every kernel gets the forward's ``y > 0 or NaN`` bit for bit (KERNELS.md, "Fused ReLU").
"""
import triton
import triton.language as tl


@triton.jit
def block_offsets(BLOCK: tl.constexpr):
    """Flat int64 offsets ``pid * BLOCK + [0, BLOCK)`` of this program's block along grid axis 0."""
    return tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def mask_byte_tile(BYTES: tl.constexpr, numel):
    """This program's ``BYTES`` packed-mask bytes as a ``[BYTES, 8]`` tile of elements: ``(byte, bit, offs,
    inside)``, element ``offs = 8 byte + bit`` (csrc/KERNELS.md, "Conventions"), ``inside = offs < numel``."""
    byte = block_offsets(BYTES)
    bit = tl.arange(0, 8)
    offs = byte[:, None] * 8 + bit[None, :]
    return byte, bit, offs, offs < numel


@triton.jit
def select(on, v):
    """``on ? v : 0`` (a selection: 0 where ``on`` is false even if ``v`` is not finite)."""
    return tl.where(on, v, 0.0)


@triton.jit
def channel_of(offs, S, C, IDX32: tl.constexpr):
    """Channel index of flat element offsets of an ``N x C x S`` tensor. The division runs in int32 when
    ``IDX32`` (the whole tensor has fewer than 2**31 elements; 64-bit division is many instructions on a GPU)."""
    q = offs
    if IDX32:
        q = offs.to(tl.int32)
    return (q // S) % C


@triton.jit
def channel_offsets(j, c, S, CS, IDX32: tl.constexpr):
    """int64 flat offsets of the elements ``j`` (in ``[0, N S)``) of channel ``c`` of an ``N x C x S`` tensor
    (``IDX32`` as in :func:`channel_of`)."""
    q = j
    if IDX32:
        q = j.to(tl.int32)
    return (q // S).to(tl.int64) * CS + c * S + (q % S)


@triton.jit
def bn_z(a, x, c):
    """The BatchNorm output before the fused ReLU, ``z = a x + c``, as one fused multiply-add."""
    return tl.fma(a, x, c)


@triton.jit
def relu_on(x):
    """The ReLU mask bit ``x > 0`` or ``x`` NaN (csrc/KERNELS.md, "ReLU and NaN": ``relu(NaN) = NaN`` and the gradient
    passes through it, as ``threshold_backward`` does)."""
    return (x > 0) | (x != x)


@triton.jit
def bn_relu_on(z, OUT: tl.constexpr):
    """The fused ReLU's mask bit :func:`relu_on` of ``z`` as stored in the output dtype ``OUT`` (a float16 / bfloat16
    ``z`` that rounds to 0 is off, like ``y``; a no-op rounding for float32 and float64)."""
    return relu_on(z.to(OUT).to(z.dtype))


@triton.jit
def div_rn(a, b, ACC: tl.constexpr):
    """``a / b`` correctly rounded: compiled Triton's float32 ``/`` is approximate (an H100 gave 1.2500001 for the
    mean of a constant 1.25 channel), ``div_rn`` takes only float32, float64 ``/`` is already IEEE."""
    if ACC == tl.float32:
        return tl.math.div_rn(a, b)
    else:
        return a / b
