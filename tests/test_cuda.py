"""Tier 4 for the CUDA backend (cuBLASLt epilogues and fastnn's CUDA kernels), beyond the shared
matrix of test_linear_act.py / test_linear_glu.py: transformer-sized and decode-sized shapes,
sizes that are not multiples of 8 (cuBLASLt's alignment rules), every epilogue path, the tensor's
own device, and the error paths. Skipped without a GPU."""
import pytest
import torch

import fastnn
from numerics import (SPECIAL, activation_grid, assert_special_values, check_against_reference, float32_math_problems,
                      make_inputs, rounded_16bit_problems, torch_linear_act, torch_linear_glu)

pytestmark = pytest.mark.gpu

SHAPES = [(4096, 768, 3072), (8, 4096, 11008), (1000, 1000, 127), (33, 17, 250), (1, 9, 1)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", list(fastnn.ACTIVATIONS))
def test_linear_act_large_and_odd(shape, dtype, activation):
    m, k, n = shape
    x, w, b = make_inputs((m, k), n, dtype, "cuda")
    check_against_reference(lambda x, w, b: fastnn.linear_act(x, w, b, activation, backend="cuda"),
                            lambda x, w, b: torch_linear_act(x, w, b, activation), [x, w, b],
                            what=f"cuda {activation} {dtype} {shape}")


@pytest.mark.parametrize("activation", ["relu", "gelu_tanh", "identity", "gelu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("grad", [True, False])
def test_epilogue_paths(activation, bias, grad):
    """cuBLASLt's fused epilogues with and without bias and aux (inference vs training)."""
    x, w, b = make_inputs((130, 64), 96, torch.bfloat16, "cuda", bias=bias, requires_grad=grad)
    inputs = [x, w] + ([b] if bias else [])
    fn = (lambda x, w, b: fastnn.linear_act(x, w, b, activation, backend="cuda")) if bias else \
        (lambda x, w: fastnn.linear_act(x, w, None, activation, backend="cuda"))
    ref = (lambda x, w, b: torch_linear_act(x, w, b, activation)) if bias else \
        (lambda x, w: torch_linear_act(x, w, None, activation))
    check_against_reference(fn, ref, inputs, what=f"{activation} bias={bias} grad={grad}")


@pytest.mark.parametrize("activation", list(fastnn.GATED))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_linear_glu_llama_shape(activation, dtype):
    inputs = make_inputs((512, 1024), 2816, dtype, "cuda", glu=True)
    check_against_reference(
        lambda x, wg, wu, bg, bu: fastnn.linear_glu(x, wg, wu, bg, bu, activation, backend="cuda"),
        lambda x, wg, wu, bg, bu: torch_linear_glu(x, wg, wu, bg, bu, activation), list(inputs), what=activation)


def test_current_stream_is_used():
    """Work is queued on torch's current stream: inputs made on the default stream are handed to a
    side stream after it waits for them, and the results are read after the side stream is done."""
    x, w, b = make_inputs((64, 32), 48, torch.bfloat16, "cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = fastnn.linear_act(x, w, b, "silu", backend="cuda")
        y.float().sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    ref = torch_linear_act(x.detach().float(), w.detach().float(), b.detach().float(), "silu")
    torch.testing.assert_close(y.float(), ref, atol=3e-2, rtol=3e-2)
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="one GPU here: the other-device case needs two")
def test_other_device():
    """Tensors on cuda:1 run on cuda:1 (and its current stream) whatever the current device."""
    dev = torch.device("cuda", 1)
    x, w, b = make_inputs((64, 32), 48, torch.bfloat16, dev)
    with torch.cuda.device(0):
        y = fastnn.linear_act(x, w, b, "silu", backend="cuda")
        y.float().sum().backward()
    torch.cuda.synchronize(dev)
    assert y.device == dev and x.grad.device == dev
    ref = torch_linear_act(x.detach().float(), w.detach().float(), b.detach().float(), "silu")
    torch.testing.assert_close(y.float(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("activation", ["identity", "relu", "gelu"])
def test_bias_grad_with_no_input_features(activation):
    """in_features == 0: y = act(b) and db = sum of dZ over rows, which does not depend on K."""
    x = torch.zeros(8, 0, device="cuda", requires_grad=True)
    w = torch.zeros(16, 0, device="cuda", requires_grad=True)
    b = torch.randn(16, device="cuda", requires_grad=True)
    check_against_reference(lambda x, w, b: fastnn.linear_act(x, w, b, activation, backend="cuda"),
                            lambda x, w, b: torch_linear_act(x, w, b, activation), [x, w, b], what="K = 0")
    dy = torch.randn(8, 16, device="cuda")
    b.grad = None
    fastnn.linear_act(x, w, b, activation, backend="cuda").backward(dy)
    assert b.grad.abs().sum() > 0


@pytest.mark.parametrize("activation", ["identity", "relu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_sliced_bias_after_aligned_bias(activation, dtype):
    """A plan chosen for a 256-byte-aligned bias is not reused for a bias 2 or 4 bytes off: the
    bias alignment is part of the plan's key (cuBLASLt picks algorithms from it)."""
    x, w, _ = make_inputs((256, 128), 96, dtype, "cuda")
    aligned = torch.randn(96, dtype=dtype, device="cuda", requires_grad=True)
    check_against_reference(lambda x, w, b: fastnn.linear_act(x, w, b, activation, backend="cuda"),
                            lambda x, w, b: torch_linear_act(x, w, b, activation), [x, w, aligned],
                            what="aligned bias")
    sliced = torch.randn(97, dtype=dtype, device="cuda")[1:].detach().requires_grad_()
    assert sliced.data_ptr() % 16 != 0
    check_against_reference(lambda x, w, b: fastnn.linear_act(x, w, b, activation, backend="cuda"),
                            lambda x, w, b: torch_linear_act(x, w, b, activation), [x, w, sliced],
                            what="sliced bias")


def test_plan_cache_is_bounded():
    """One plan per distinct M (dynamic shapes) never grows the cache past its limit."""
    from fastnn import _native
    native = _native.cuda_module()
    limit = native.plan_cache_limit()
    w = torch.randn(16, 32, device="cuda", dtype=torch.bfloat16)
    for m in range(1, limit + 40):
        x = torch.randn(m, 32, device="cuda", dtype=torch.bfloat16)
        fastnn.linear_act(x, w, None, "identity", backend="cuda")
        assert native.plan_cache_size() <= limit


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["relu", "gelu_tanh"])
def test_activation_epilogue_probe_decides(dtype, activation):
    """Open question: do cuBLASLt's RELU and GELU epilogues meet fastnn's definitions (relu(NaN) =
    NaN, relu'(0) = 0, the kept z exact; its tanh GELU within the numerics rule, in float32 too)?
    The probe decides per dtype, and either way the results follow the rule: exact zeros in z,
    a NaN row, training and inference."""
    from fastnn.backends import cuda as cuda_backend
    gen = torch.Generator().manual_seed(1)
    x = (torch.randint(-2, 3, (64, 16), generator=gen).double() / 4)
    w = (torch.randint(-2, 3, (128, 16), generator=gen).double() / 4)
    b = (torch.randint(-2, 3, (128,), generator=gen).double() / 4)
    x[5, 0] = float("nan")
    xd, wd, bd = (t.to(dtype=dtype, device="cuda") for t in (x, w, b))
    for grad in (False, True):
        for t in (xd, wd, bd):
            t.requires_grad_(grad)
        y = fastnn.linear_act(xd, wd, bd, activation, backend="cuda")
        ref = torch_linear_act(x.cuda(), w.cuda(), b.cuda(), activation)
        assert torch.equal(torch.isnan(y), torch.isnan(ref)), "NaN must propagate"
        finite = ~torch.isnan(ref)
        if activation == "relu":
            assert torch.equal(y[finite].double(), ref[finite].to(dtype).double())
        if grad:
            dy = torch.ones_like(y)
            y.backward(dy)
            z = x.cuda() @ w.cuda().t() + b.cuda()
            dz = activations_grad(activation, z)
            rows = torch.isfinite(z).all(1)
            expect_dx = (dz[rows] @ w.cuda())
            assert torch.allclose(xd.grad[rows].double(), expect_dx, atol=0.05, rtol=0.02)
    print(f"{activation} {dtype}: {cuda_backend.epilogue_trust()}")


def activations_grad(name, z):
    return fastnn.activations.get(name).grad(z)


@pytest.mark.parametrize("m", [4096, 65536])
def test_float32_bias_grad_summation(m):
    """Open question: the float32 bias gradient over many rows (fastnn's column sum; cuBLASLt's
    BGRADB is used for 16-bit only) against the numerics rule."""
    x, w, b = make_inputs((m, 64), 256, torch.float32, "cuda")
    check_against_reference(lambda x, w, b: fastnn.linear_act(x, w, b, "identity", backend="cuda"),
                            lambda x, w, b: torch_linear_act(x, w, b, "identity"), [x, w, b], what=f"M={m}")


@pytest.mark.parametrize("case", ["odd-n", "sliced-bias", "fp32", "fp32-tf32", "bf16", "fp16"])
def test_which_path_serves(case, monkeypatch):
    """Open question: which epilogues cuBLASLt's heuristic accepts per dtype and alignment. Each case
    must give the rule's results; the path that served is printed (and in the GPU summary)."""
    from fastnn.backends import cuda as cuda_backend
    dtype = {"fp32": torch.float32, "fp32-tf32": torch.float32, "fp16": torch.float16}.get(case, torch.bfloat16)
    n = 127 if case == "odd-n" else 256
    if case == "fp32-tf32":
        monkeypatch.setattr(cuda_backend, "tf32_allowed", lambda: True)
    before = cuda_backend.paths()
    for activation in ("identity", "relu", "gelu_tanh", "gelu"):
        x, w, b = make_inputs((192, 96), n, dtype, "cuda")
        if case == "sliced-bias":
            b = torch.randn(n + 1, dtype=dtype, device="cuda")[1:].detach().requires_grad_()
        if case != "fp32-tf32":  # TF32 products are outside the float32 rule by design
            check_against_reference(lambda x, w, b: fastnn.linear_act(x, w, b, activation, backend="cuda"),
                                    lambda x, w, b: torch_linear_act(x, w, b, activation), [x, w, b], what=case)
        else:
            fastnn.linear_act(x, w, b, activation, backend="cuda").sum().backward()
    served_now = {key: {p: n - before.get(key, {}).get(p, 0) for p, n in served.items()}
                  for key, served in cuda_backend.paths().items()}
    served_now = {key: {p: n for p, n in served.items() if n} for key, served in served_now.items()}
    for key, served in sorted(served_now.items()):
        if served:
            print(f"PATH {case}: {key} -> {served}")
    assert any(key[0] == "linear_act_fwd" and served for key, served in served_now.items())


def test_cuda_backend_refuses_float64_and_cpu():
    x, w, b = make_inputs((4, 8), 8, torch.float64, "cuda", requires_grad=False)
    with pytest.raises(fastnn.BackendUnavailableError, match="cuda.*float64"):
        fastnn.linear_act(x, w, b, backend="cuda")
    with pytest.raises(fastnn.BackendUnavailableError, match="CUDA tensors"):
        fastnn.linear_act(x.cpu(), w.cpu(), b.cpu(), backend="cuda")


def test_auto_on_gpu_is_a_native_backend():
    x, w, b = make_inputs((16, 32), 32, torch.bfloat16, "cuda")
    name = fastnn.backends.resolve("auto", "linear_act", x, [w], fastnn.activations.get("gelu"))
    assert name in ("cuda", "triton")


def test_compile_fullgraph_cuda_backend():
    torch._dynamo.reset()
    x, w, b = make_inputs((64, 128), 256, torch.bfloat16, "cuda")
    f = torch.compile(lambda x, w, b: fastnn.linear_act(x, w, b, "relu", backend="cuda") + 1, fullgraph=True)
    check_against_reference(f, lambda x, w, b: torch_linear_act(x, w, b, "relu") + 1, [x, w, b], what="compile")


def kernel_math(act, z):
    """act(z) and act'(z) (dY = 1) from the CUDA backend's epilogue and act_backward kernels, called
    directly on a CUDA z [rows, cols] with any row stride; act' None for the identity (its backward
    writes nothing)."""
    from fastnn import _native
    from fastnn.backends.cuda import relu_aux_ld

    C = _native.cuda_module()
    m, n = z.shape
    ld = z.stride(0)
    device, stream = z.device.index, torch.cuda.current_stream(z.device).cuda_stream
    code = _native.DTYPE_CODES[z.dtype]
    y = torch.empty((m, n), dtype=z.dtype, device=z.device)
    mask = torch.zeros(m, relu_aux_ld(n) // 8, dtype=torch.uint8, device=z.device) if act.saves == "mask" else None
    C.bias_act_forward(device, stream, code, act.code, m, n, z.data_ptr(), ld, 0, y.data_ptr(), n,
                       0 if mask is None else mask.data_ptr(), relu_aux_ld(n))
    if act.saves == "nothing":
        return y, None
    ones, dz = torch.ones_like(y), torch.empty_like(y)
    preact = act.saves == "preact"
    C.act_backward(device, stream, code, act.code, m, n, ones.data_ptr(), n, z.data_ptr() if preact else 0,
                   ld if preact else 0, 0 if mask is None else mask.data_ptr(), relu_aux_ld(n), dz.data_ptr(), n, 0, 0)
    return y, dz


def every_value(dtype):
    """Every value of a 16-bit type up to 2^16 in magnitude, or float32's activation grid, then NaN,
    +-inf and +-0. (Beyond 2^16 no pre-activation is sane, and float32 math overflows in gelu_tanh's
    derivative from |z| of about 4e19, its z^2 term, PyTorch's gelu_backward included (NaN there too),
    and in quick_gelu's from 2e38, 1.702 z: there fastnn gives NaN, PyTorch's autograd 1 or 0.)"""
    if dtype == torch.float32:
        z = activation_grid(torch.float32)
    else:
        z = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
        z = z[torch.isfinite(z) & (z.abs() <= 2**16)]
    return torch.cat([z, torch.tensor(SPECIAL, dtype=dtype)])


@pytest.mark.parametrize("cols", [512, 511], ids=["16-byte", "1-wide"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", list(fastnn.ACTIVATIONS.values()), ids=lambda a: a.name)
def test_kernel_math_point_by_point(act, dtype, cols):
    """The CUDA kernels' own activation math, which no CPU runs (gelu's Gaussian tail takes an
    approximate reciprocal there, the others CUDA's math library), by the host functors' rules
    (numerics: float32_math_problems, rounded_16bit_problems) on every bfloat16 or float16 value up
    to 2^16 in magnitude, or float32's grid, and at NaN, +-inf and +-0 as the reference gives them;
    in rows of 512 (16-byte accesses: the forward's pass over a whole buffer) and of 511 elements
    512 apart (one element at a time: its pass over rows with gaps, and act' per element)."""
    z = every_value(dtype)
    padded = torch.zeros(-(-z.numel() // cols) * cols, dtype=dtype)
    padded[:z.numel()] = z
    # rows 512 elements apart (moved first: .cuda() of the view would close its gaps)
    rows = torch.nn.functional.pad(padded.view(-1, cols), (0, 512 - cols)).cuda()[:, :cols]
    y, dz = (None if t is None else t.flatten()[:z.numel()].cpu() for t in kernel_math(act, rows))
    finite = torch.isfinite(z)
    if dtype == torch.float32:
        problems = float32_math_problems(act, z[finite], y[finite], None if dz is None else dz[finite])
    else:
        problems = rounded_16bit_problems(act, dtype, z[finite].float(), y[finite], None if dz is None else dz[finite])
    assert not problems, problems
    special = z[-len(SPECIAL):].float()
    # (the identity's backward writes nothing: its derivative is the reference's)
    assert_special_values(act, special, y[-len(SPECIAL):].float(),
                          act.grad(special.double()).float() if dz is None else dz[-len(SPECIAL):].float(), dtype)


def test_plain_cuda_call_screen():
    """The screen that sends a plain eager CUDA call straight to the cuda backend (functional.py:
    _plain_call) admits only what the general path would send there unchanged."""
    from fastnn import functional as FN

    x, w, b = make_inputs((6, 10), 12, torch.bfloat16, "cuda")
    assert FN._plain_call("auto", x, (w,), (b,)) == "cuda"
    assert FN._plain_call("cuda", x.reshape(2, 3, 10), (w,), (None,)) == "cuda"
    refused = [("triton", x, (w,), (b,)), ("torch", x, (w,), (b,)), ("cpu", x, (w,), (b,)),
               ("auto", x.double(), (w.double(),), (None,)), ("auto", x, (w.float(),), (b,)),
               ("auto", x, (w.cpu(),), (b,)), ("auto", x, (w,), (b.cpu(),)), ("auto", x[:, :9], (w,), (b,))]
    for backend, *args in refused:
        assert FN._plain_call(backend, *args) is None, backend
    with torch.autocast("cuda", dtype=torch.float16):
        assert FN._plain_call("auto", x, (w,), (b,)) is None


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("activation", ["gelu", "relu", "identity", "swiglu"])
def test_plain_cuda_call_same_bits_as_the_general_path(grad, activation):
    """A screened CUDA call against the general path's (the screen switched off): output and
    gradients bit for bit, for linear_act / linear_glu and the MLP block. (bfloat16: its cuBLASLt
    split-K sums stay in a float32 workspace, lt_gemm.cpp, so equal calls give equal bits.)"""
    dtype = torch.bfloat16
    from fastnn import functional as FN

    gated = activation in fastnn.GATED
    x, wg, wu, bg, bu = make_inputs((3, 70, 96), 80, dtype, "cuda", requires_grad=grad, glu=True)
    w2, b2 = make_inputs((1, 80), 48, dtype, "cuda", requires_grad=grad)[1:]

    def run():
        y1 = (fastnn.linear_glu(x, wg, wu, bg, bu, activation) if gated
              else fastnn.linear_act(x, wg, bg, activation))
        y2 = fastnn.mlp(x, wg, bg, w2, b2, activation, up_weight=wu if gated else None,
                        up_bias=bu if gated else None)
        outs = [y1, y2]
        if grad:
            leaves = [x, wg, bg, w2, b2] + ([wu, bu] if gated else [])
            outs += torch.autograd.grad((y1.float().square().sum() + y2.float().sum()), leaves, allow_unused=True)
        return outs

    assert FN._plain_call("auto", x, (wg,), (bg,)) == "cuda"
    screened = run()
    original = FN._plain_call
    FN._plain_call = lambda *args: None
    try:
        general = run()
    finally:
        FN._plain_call = original
    for a, c in zip(screened, general):
        assert (a is None and c is None) or torch.equal(a, c)


@pytest.mark.parametrize("activation", ["gelu", "relu", "gelu_tanh", "swiglu"])
def test_cuda_graphs(activation):
    """The cuda backend under CUDA graphs, the remedy where the host is the bound (decode-sized calls):
    torch.cuda.make_graphed_callables of a FusedMLP (its forward and backward captured, the block as
    one fastnn.mlp op), replayed on new inputs, gives the outputs and gradients of the same module run
    eagerly; torch.cuda.graph captures a no-gradient forward the same way."""
    import copy

    torch.manual_seed(0)
    kw = dict(device="cuda", dtype=torch.bfloat16)
    model = fastnn.FusedMLP(64, 256, activation=activation, backend="cuda", **kw)
    eager = copy.deepcopy(model)
    graphed = torch.cuda.make_graphed_callables(model, (torch.randn(16, 64, **kw, requires_grad=True),))
    for _ in range(2):
        x, g = torch.randn(16, 64, **kw), torch.randn(16, 64, **kw)
        xg, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = graphed(xg)
        y.backward(g)
        ye = eager(xe)
        ye.backward(g)
        torch.testing.assert_close(y, ye)
        torch.testing.assert_close(xg.grad, xe.grad)
        for (name, p), pe in zip(model.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, pe.grad, msg=lambda m, name=name: f"{name}: {m}")
        model.zero_grad(set_to_none=True)
        eager.zero_grad(set_to_none=True)

    static_x = torch.randn(16, 64, **kw)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                eager(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = eager(static_x)
        for _ in range(2):
            static_x.copy_(torch.randn(16, 64, **kw))
            graph.replay()
            torch.testing.assert_close(static_y, eager(static_x))
