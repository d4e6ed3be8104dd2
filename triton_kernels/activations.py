"""The activations of fastnn in Triton: one definition of each and of its derivative, selected at
compile time by ACT (the codes of fastnn/activations.py and csrc/include/fastnn/activations.h).
tests/test_triton.py checks them against the Python reference through `act_eval_kernel`.

Only tl.exp, tl.math.erf and arithmetic are used, so the same code runs compiled on a GPU and
under TRITON_INTERPRET=1 on CPU tensors.
"""
import triton
import triton.language as tl

# globals a kernel reads must be tl.constexpr objects (an annotation "X: tl.constexpr = 1" does not compile)
IDENTITY = tl.constexpr(0)
RELU = tl.constexpr(1)
GELU = tl.constexpr(2)
GELU_TANH = tl.constexpr(3)
SILU = tl.constexpr(4)
SIGMOID = tl.constexpr(5)
TANH = tl.constexpr(6)
LEAKY_RELU = tl.constexpr(7)
SQUARED_RELU = tl.constexpr(8)
QUICK_GELU = tl.constexpr(9)
QUICK_GELU_SCALE = tl.constexpr(1.702)

LEAKY_SLOPE = tl.constexpr(0.01)
SQRT1_2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
TWO_SQRT_2_PI = tl.constexpr(1.5957691216057308)  # 2 sqrt(2 / pi)
GELU_K1 = tl.constexpr(0.044715)


@triton.jit
def sigmoid_pair(z):
    """(sigmoid(z), 1 - sigmoid(z)), both to full relative accuracy: 1 - s cancels for large z."""
    e = tl.exp(-tl.abs(z))
    r = 1.0 / (1.0 + e)
    pos = z >= 0
    return tl.where(pos, r, e * r), tl.where(pos, e * r, r)


@triton.jit
def expm1_nonpos(x):
    """exp(x) - 1 for x <= 0, without the cancellation of exp(x) - 1 near 0."""
    small = x > -0.5
    # Taylor series to x^8 / 8!: below 2e-9 relative on (-0.5, 0]
    p = 2.48015873015873016e-5
    p = p * x + 1.98412698412698413e-4
    p = p * x + 1.38888888888888889e-3
    p = p * x + 8.33333333333333333e-3
    p = p * x + 4.16666666666666667e-2
    p = p * x + 1.66666666666666667e-1
    p = p * x + 0.5
    p = p * x * x + x
    return tl.where(small, p, tl.exp(x) - 1.0)


@triton.jit
def tanh(z):
    """tanh(z) = -expm1(-2|z|) / (2 + expm1(-2|z|)) with the sign of z: accurate near 0."""
    e = expm1_nonpos(-2.0 * tl.abs(z))
    t = -e / (2.0 + e)
    return tl.where(z < 0, -t, t)


@triton.jit
def act_fwd(z, ACT: tl.constexpr):
    """act(z) for float32 z. (Tensor operands come first in products with the constexpr globals: the
    interpreter cannot make a constexpr of constexpr * tensor.)"""
    if ACT == RELU:
        out = tl.where(z < 0, 0.0, z)  # tl.maximum would turn NaN into 0
    elif ACT == GELU:
        out = 0.5 * z * (1.0 + tl.math.erf(z * SQRT1_2))
    elif ACT == GELU_TANH:
        # 0.5 z (1 + tanh(u)) = z sigmoid(2u): no cancellation for negative z
        s, _ = sigmoid_pair((z + z * z * z * GELU_K1) * TWO_SQRT_2_PI)
        out = z * s
    elif ACT == SILU:
        s, _ = sigmoid_pair(z)
        out = z * s
    elif ACT == SIGMOID:
        s, _ = sigmoid_pair(z)
        out = s
    elif ACT == TANH:
        out = tanh(z)
    elif ACT == LEAKY_RELU:
        out = tl.where(z > 0, z, z * LEAKY_SLOPE)
    elif ACT == SQUARED_RELU:
        out = tl.where(z < 0, 0.0, z * z)
    elif ACT == QUICK_GELU:
        s, _ = sigmoid_pair(z * QUICK_GELU_SCALE)
        out = z * s
    else:
        out = z
    return out


@triton.jit
def act_grad(z, ACT: tl.constexpr):
    """d act / dz for float32 z."""
    if ACT == RELU:
        out = tl.where(z <= 0, 0.0, 1.0)  # torch's threshold_backward: 0 at z == 0, 1 at NaN
    elif ACT == GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(z * SQRT1_2))
        out = cdf + z * tl.exp(-0.5 * z * z) * INV_SQRT_2PI
    elif ACT == GELU_TANH:
        s, sc = sigmoid_pair((z + z * z * z * GELU_K1) * TWO_SQRT_2_PI)
        out = s + z * s * sc * TWO_SQRT_2_PI * (1.0 + z * z * (3.0 * GELU_K1))
    elif ACT == SILU:
        s, sc = sigmoid_pair(z)
        out = s * (1.0 + z * sc)
    elif ACT == SIGMOID:
        s, sc = sigmoid_pair(z)
        out = s * sc
    elif ACT == TANH:
        e = tl.exp(-2.0 * tl.abs(z))
        out = 4.0 * e / ((1.0 + e) * (1.0 + e))
    elif ACT == LEAKY_RELU:
        out = tl.where(z > 0, 1.0, LEAKY_SLOPE)
    elif ACT == SQUARED_RELU:
        out = tl.where(z < 0, 0.0, 2.0 * z)  # NaN propagates, as in activations.h
    elif ACT == QUICK_GELU:
        s, sc = sigmoid_pair(z * QUICK_GELU_SCALE)
        out = s * (1.0 + z * sc * QUICK_GELU_SCALE)
    else:
        out = tl.full(z.shape, 1.0, tl.float32)
    return out


@triton.jit
def mask_bit(z, ACT: tl.constexpr):
    """The sign mask's bit (relu, leaky_relu; int32 0 / 1): whether dY passes unscaled. z > 0, and
    for relu NaN too (torch's threshold_backward passes dY there; leaky_relu_backward scales it)."""
    if ACT == RELU:
        out = tl.where(z <= 0, 0, 1)
    else:
        out = tl.where(z > 0, 1, 0)
    return out


@triton.jit
def act_eval_kernel(z_ptr, out_ptr, dout_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    """Test hook: out = act(z), dout = act'(z), elementwise, in float32."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, act_fwd(z, ACT), mask=mask)
    tl.store(dout_ptr + offs, act_grad(z, ACT), mask=mask)
