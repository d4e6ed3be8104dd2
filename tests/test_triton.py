"""The Triton backend. Tier 2 (no GPU): the real kernels run on CPU tensors under
TRITON_INTERPRET=1 (set in conftest.py before fastnn is imported), in float32 (ieee dot) and
float16 only: the interpreter's bf16 dot multiplies raw bit patterns. Tier 4 (a GPU): the same
tests on CUDA tensors, bfloat16 included, plus larger shapes and torch.compile."""
import inspect
import os

import pytest
import torch

import fastnn
from cases import HAS_CUDA
from fastnn import activations
from fastnn.backends import triton as triton_backend
from numerics import (SPECIAL, assert_special_values, check_against_reference, make_inputs, torch_linear_act,
                      torch_linear_glu)

pytestmark = pytest.mark.skipif(triton_backend.IMPORT_ERROR is not None,
                                reason=f"triton not usable: {triton_backend.IMPORT_ERROR}")

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cuda" if HAS_CUDA and not INTERPRETER else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# awkward sizes: 1, below a tile, tile edges, not multiples of 8 (M, K, N)
SHAPES = [(1, 1, 1), (3, 17, 65), (17, 65, 127), (65, 127, 3), (127, 3, 17), (33, 40, 1)]
# on a GPU: transformer and decode shapes too (fewer activations: every variant is compiled)
GPU_SHAPES = [(1000, 1000, 127), (4096, 768, 3072), (8, 4096, 11008)]


def _act(x, w, b, activation, **kw):
    return fastnn.linear_act(x, w, b, activation, backend="triton", **kw)


@pytest.mark.parametrize("activation", list(fastnn.ACTIVATIONS))
def test_triton_activation_functions(activation):
    """The Triton definitions of act and act' against the Python reference (float32)."""
    import triton

    from fastnn.triton_kernels.activations import act_eval_kernel

    act = activations.get(activation)
    z = torch.cat([torch.linspace(-10, 10, 4001), torch.tensor([0.0, 1e-6, -1e-6, 30.0, -30.0])]).to(DEVICE)
    out, dout = torch.empty_like(z), torch.empty_like(z)
    act_eval_kernel[(triton.cdiv(z.numel(), 1024),)](z, out, dout, z.numel(), ACT=act.code, BLOCK=1024)
    for name, got, ref_fn, theirs_fn in (("value", out, act.fn, act.fn), ("derivative", dout, act.grad, act.grad)):
        ref = ref_fn(z.double())
        theirs = theirs_fn(z).double()  # PyTorch's own float32
        err = (got.double() - ref).abs()
        tol = 2 * (theirs - ref).abs() + 8 * torch.finfo(torch.float32).eps * ref.abs().clamp(min=1.0)
        bad = err > tol
        assert not bad.any(), f"{activation} {name} at z={z[bad][:3].tolist()}: {got[bad][:3].tolist()} vs {ref[bad][:3].tolist()}"
    # NaN, +-inf, +-0 as the C++ functors give them
    special = torch.tensor(SPECIAL, device=DEVICE)
    out, dout = torch.empty_like(special), torch.empty_like(special)
    act_eval_kernel[(1,)](special, out, dout, special.numel(), ACT=act.code, BLOCK=1024)
    assert_special_values(act, special.cpu(), out.cpu(), dout.cpu())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", list(fastnn.ACTIVATIONS))
def test_linear_act(shape, dtype, activation):
    m, k, n = shape
    x, w, b = make_inputs((m, k), n, dtype, DEVICE)
    check_against_reference(lambda x, w, b: _act(x, w, b, activation),
                            lambda x, w, b: torch_linear_act(x, w, b, activation), [x, w, b],
                            what=f"triton {activation} {dtype} {shape}")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", list(fastnn.GATED))
def test_linear_glu(shape, dtype, activation):
    m, k, n = shape
    inputs = make_inputs((m, k), n, dtype, DEVICE, glu=True)
    check_against_reference(
        lambda x, wg, wu, bg, bu: fastnn.linear_glu(x, wg, wu, bg, bu, activation, backend="triton"),
        lambda x, wg, wu, bg, bu: torch_linear_glu(x, wg, wu, bg, bu, activation), list(inputs),
        what=f"triton {activation} {dtype} {shape}")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("activation", ["gelu", "relu", "silu"])
def test_linear_act_gpu_shapes(shape, activation):
    m, k, n = shape
    x, w, b = make_inputs((m, k), n, torch.bfloat16, "cuda")
    check_against_reference(lambda x, w, b: _act(x, w, b, activation),
                            lambda x, w, b: torch_linear_act(x, w, b, activation), [x, w, b],
                            what=f"triton {activation} {shape}")


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
def test_linear_glu_gpu_shape(activation):
    inputs = make_inputs((512, 1024), 2816, torch.bfloat16, "cuda", glu=True)
    check_against_reference(
        lambda x, wg, wu, bg, bu: fastnn.linear_glu(x, wg, wu, bg, bu, activation, backend="triton"),
        lambda x, wg, wu, bg, bu: torch_linear_glu(x, wg, wu, bg, bu, activation), list(inputs), what=activation)


@pytest.mark.parametrize("activation", ["gelu", "relu", "identity"])
@pytest.mark.parametrize("path", ["tma", "split_k"])
def test_forward_paths(monkeypatch, activation, path):
    """The TMA persistent kernel and the split-K kernel (chosen on sm90+ / for decode-sized M on a
    GPU), forced here so that they run under the interpreter too."""
    from fastnn.triton_kernels import linear_act as K

    if path == "tma" and DEVICE == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA tensor descriptors need sm90+")
    real = K.forward
    force = {"force_tma": True} if path == "tma" else {"force_split_k": 3}
    monkeypatch.setattr(K, "forward", lambda *a, **kw: real(*a, **{**kw, **force}))
    for m, k, n in [(5, 100, 24), (40, 64, 48), (1, 200, 16)]:
        x, w, b = make_inputs((m, k), n, torch.float32, DEVICE)
        check_against_reference(lambda x, w, b: _act(x, w, b, activation),
                                lambda x, w, b: torch_linear_act(x, w, b, activation), [x, w, b], what=path)


@pytest.mark.parametrize("activation", ["silu", "leaky_relu"])
def test_strides_and_leading_dims(activation):
    base = torch.randn(2, 30, 3, 24, device=DEVICE)
    x = base[:, ::2, 1, :].detach().requires_grad_()  # (2, 15, 24), not contiguous
    w = (torch.randn(24, 19, device=DEVICE) / 5).t().detach().requires_grad_()  # (19, 24), transposed storage
    b = torch.randn(38, device=DEVICE)[::2].detach().requires_grad_()
    check_against_reference(lambda x, w, b: _act(x, w, b, activation),
                            lambda x, w, b: torch_linear_act(x, w, b, activation), [x, w, b], what="strides")


def test_no_bias_partial_grads_zero_rows():
    x, w, _ = make_inputs((9, 20), 11, torch.float32, DEVICE, bias=False)
    check_against_reference(lambda x, w: _act(x, w, None, "gelu"), lambda x, w: torch_linear_act(x, w, None, "gelu"),
                            [x, w], what="no bias")
    x.requires_grad_(False)
    check_against_reference(lambda x, w: _act(x, w, None, "relu"), lambda x, w: torch_linear_act(x, w, None, "relu"),
                            [x, w], what="dW only")
    x0, w0, b0 = make_inputs((0, 8), 5, torch.float32, DEVICE)
    y = _act(x0, w0, b0, "gelu")
    assert y.shape == (0, 5)
    y.sum().backward()
    assert torch.equal(b0.grad, torch.zeros_like(b0)) and torch.equal(w0.grad, torch.zeros_like(w0))


def test_opcheck_triton_ops():
    # The interpreter executes kernels even under fake tensors, so there only the schema and the
    # autograd registration are checked; on a GPU, every opcheck test.
    utils = None if DEVICE == "cuda" else ("test_schema", "test_autograd_registration")
    x, w, b = make_inputs((6, 16), 8, torch.float32, DEVICE)
    kw = {} if utils is None else {"test_utils": utils}
    torch.library.opcheck(torch.ops.fastnn.triton_linear_act_fwd.default, (x, w, b, "gelu", True), **kw)
    torch.library.opcheck(torch.ops.fastnn.triton_linear_act_fwd.default, (x, w, None, "relu", True), **kw)
    inputs = make_inputs((6, 16), 8, torch.float32, DEVICE, glu=True)
    torch.library.opcheck(torch.ops.fastnn.triton_linear_glu_fwd.default, (*inputs, "swiglu", True), **kw)


@pytest.mark.skipif(not INTERPRETER, reason="the interpreter's ops; on a GPU see test_compile_fullgraph_triton")
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_compile_under_the_interpreter(grad):
    """torch.compile of the triton backend on CPU tensors runs the interpreter's kernels: its ops are
    opaque there (as triton_ops, Inductor inlined their bodies, whose launches the interpreter's
    shape-only wrapper drops while tracing, and ran uninitialised outputs: NaN)."""
    import torch._inductor.config as inductor_config
    torch._dynamo.reset()
    x, w, b = make_inputs((5, 16), 24, torch.float32, DEVICE, requires_grad=grad)
    f = torch.compile(lambda x, w, b: _act(x, w, b, "gelu") * 2, fullgraph=True)
    with inductor_config.patch(force_disable_caches=True):  # (a cached graph of older code would be reused)
        check_against_reference(f, lambda x, w, b: torch_linear_act(x, w, b, "gelu") * 2, [x, w, b],
                                what="compile")


@pytest.mark.gpu
def test_compile_fullgraph_triton():
    torch._dynamo.reset()
    x, w, b = make_inputs((64, 128), 256, torch.bfloat16, "cuda")
    f = torch.compile(lambda x, w, b: _act(x, w, b, "gelu") * 2, fullgraph=True)
    check_against_reference(f, lambda x, w, b: torch_linear_act(x, w, b, "gelu") * 2, [x, w, b], what="compile")


def test_backend_errors():
    x, w, b = make_inputs((4, 8), 8, torch.float64, DEVICE, requires_grad=False)
    with pytest.raises(fastnn.BackendUnavailableError, match="triton.*float64"):
        _act(x, w, b, "gelu")


@pytest.mark.skipif(not INTERPRETER, reason="checks the interpreter")
def test_interpreter_fault_is_named(monkeypatch):
    """Where Triton's interpreter cannot run the kernels (3.6's beside numpy 2.4: triton-lang/triton#9171)
    the probe says why, and the backend reports it as the reason it cannot serve (not each kernel
    with an InterpreterError): here the probe's launch made to fail."""
    from fastnn.triton_kernels import common
    assert common.interpreter_fault() is None  # this interpreter runs them

    class Refusing:
        def __getitem__(self, grid):
            def launch(*args):
                raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
            return launch

    monkeypatch.setattr(common, "_loop_to_tensor_bound", Refusing())
    fault = common.interpreter_fault()
    assert "interpreter cannot run its kernels" in fault and "numpy < 2.4" in fault
    monkeypatch.setattr(triton_backend, "IMPORT_ERROR", fault)
    x, w, b = make_inputs((4, 8), 8, torch.float32, DEVICE, requires_grad=False)
    with pytest.raises(fastnn.BackendUnavailableError, match="interpreter cannot run its kernels.*numpy < 2.4"):
        _act(x, w, b, "gelu")


def test_autotune_key_separates_kernel_variants():
    """A tuned choice is reused only for the same compiled variant: every constexpr argument but the
    tile shape is in the key (one choice shared by gelu-with-derivative and identity would pick a
    spilling or oversized config for one of them)."""
    from fastnn.triton_kernels import linear_act, linear_glu
    tile = {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "NUM_SMS"}
    tuned = [linear_act.fwd_tuned, linear_act.fwd_tma_tuned, linear_act.splitk_tuned, linear_act.dgrad_tuned,
             linear_act.wgrad_tuned, linear_glu.glu_tuned]
    for kernel in tuned:
        signature = inspect.signature(kernel.fn.fn)  # the Python function (JIT or interpreted)
        variants = {n for n, p in signature.parameters.items() if "constexpr" in str(p.annotation)} - tile
        assert variants <= set(kernel.keys), (kernel.fn.fn.__name__, variants - set(kernel.keys))
        assert {"M_BUCKET", "N", "K"} <= set(kernel.keys)


def test_pruner_fits_shared_memory_and_registers(monkeypatch):
    """Configs are shrunk to the GPU's shared memory, and a forward whose epilogue would spill (gelu's
    z and derivative beside a 128x256 accumulator on 8 warps) is dropped while a smaller one is left."""
    from fastnn.triton_kernels import common, linear_act, linear_glu
    monkeypatch.setattr(common, "shared_memory_limit", lambda device: 232448)
    x, w = torch.zeros(256, 1024), torch.zeros(1024, 1024)

    def shapes(configs):
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in configs}

    named = {"x_ptr": x, "w_ptr": w}
    plain = common.prune_configs(linear_act.FWD_CONFIGS, named, ACT=0, SAVE=0)
    gelu = common.prune_configs(linear_act.FWD_CONFIGS, named, ACT=2, SAVE=2)
    assert (128, 256, 8) in shapes(plain) and (128, 256, 8) not in shapes(gelu) and (128, 128, 8) in shapes(gelu)
    glu = common.prune_configs(linear_glu.GLU_CONFIGS, {"x_ptr": x, "wg_ptr": w, "wu_ptr": w}, ACT=4, SAVE=True)
    assert (128, 128, 8) not in shapes(glu) and glu
    decode = common.prune_configs(linear_act.FWD_CONFIGS, {"x_ptr": x[:8], "w_ptr": w, "M": 8}, ACT=0, SAVE=0)
    assert decode and all(c.kwargs["BLOCK_M"] <= 64 for c in decode)
    unaligned = common.prune_configs(linear_act.FWD_CONFIGS, {"x_ptr": x, "w_ptr": w, "K": 1000}, ACT=2, SAVE=2)
    assert unaligned and all(c.kwargs["BLOCK_K"] <= 32 for c in unaligned)
    for weights, configs in ((1, plain), (1, gelu), (2, glu)):  # float32 tiles: stages and K tiles were cut
        for c in configs:
            bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
            assert (bm * bk + bn * bk * weights) * 4 * c.num_stages <= 232448


@pytest.mark.skipif(not INTERPRETER, reason="runs the kernels directly under the interpreter")
@pytest.mark.parametrize("activation", ["relu", "gelu", "identity"])
def test_wgrad_split_over_m(activation):
    """wgrad split over M (for few N x K tiles) gives the unsplit dW and db: each split sums its rows
    into a float32 slice, added in split order; row ranges that do not end on a tile are masked."""
    from fastnn.triton_kernels import linear_act as K
    act = activations.get(activation)
    save = {"nothing": 0, "mask": 1, "preact": 2}[act.saves]
    torch.manual_seed(0)
    x, w, b = torch.randn(300, 24), torch.randn(40, 24) / 5, torch.randn(40)
    _, saved = K.forward(x, w, b, act.code, save)
    dy = torch.randn(300, 40)
    dz = dy * act.grad(x @ w.t() + b)
    for split in (1, 3):
        dw, db = K.wgrad(dy, saved, save, activation == "leaky_relu", x, True, True, force_split_m=split)
        torch.testing.assert_close(dw, dz.t() @ x, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(db, dz.sum(0), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("recompute", ["none", "activation", "fc1"])
@pytest.mark.parametrize("activation", ["gelu", "relu", "swiglu"])
def test_mlp_block(recompute, activation):
    """fastnn.mlp on the Triton backend (the block op: fc2 and the hidden gradient on Triton's
    kernels), each memory level, against its PyTorch composite."""
    gated = activation in fastnn.GATED
    x = torch.randn(2, 33, 32, device=DEVICE, requires_grad=True)
    w1, w2 = (torch.randn(48, 32, device=DEVICE) / 6).requires_grad_(), (torch.randn(16, 48, device=DEVICE) / 7).requires_grad_()
    b1, b2 = torch.randn(48, device=DEVICE, requires_grad=True), torch.randn(16, device=DEVICE, requires_grad=True)
    wu = (torch.randn(48, 32, device=DEVICE) / 6).requires_grad_() if gated else None

    def eager(x, w1, b1, w2, b2, wu):
        z = torch.nn.functional.linear(x, w1, b1)
        h = (activations.get_gated(activation).fn(z) * torch.nn.functional.linear(x, wu)) if gated else \
            activations.get(activation).fn(z)
        return torch.nn.functional.linear(h, w2, b2)

    check_against_reference(
        lambda x, w1, b1, w2, b2, wu: fastnn.mlp(x, w1, b1, w2, b2, activation, up_weight=wu, recompute=recompute,
                                                 backend="triton"),
        eager, [x, w1, b1, w2, b2, wu], what=f"triton mlp {activation} {recompute}")


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["gelu-2048x768x3072", "relu-decode-8x4096x4096", "swiglu-512x1024x2816",
                                  "gelu-wgrad-split-8192x768x768"])
def test_tuned_configs_on_gpu(monkeypatch, case):
    """Autotuning on (the GPU script turns it off for the rest of the suite): every config the pruner
    keeps is timed and the chosen one's results are checked, forward and backward, bf16."""
    monkeypatch.setenv("FASTNN_TRITON_AUTOTUNE", "1")
    activation, *_, shape = case.split("-")
    m, k, n = map(int, shape.split("x"))
    if activation in fastnn.GATED:
        inputs = make_inputs((m, k), n, torch.bfloat16, "cuda", glu=True)
        check_against_reference(
            lambda x, wg, wu, bg, bu: fastnn.linear_glu(x, wg, wu, bg, bu, activation, backend="triton"),
            lambda x, wg, wu, bg, bu: torch_linear_glu(x, wg, wu, bg, bu, activation), list(inputs), what=case)
        return
    x, w, b = make_inputs((m, k), n, torch.bfloat16, "cuda")
    check_against_reference(lambda x, w, b: _act(x, w, b, activation),
                            lambda x, w, b: torch_linear_act(x, w, b, activation), [x, w, b], what=case)


@pytest.mark.skipif(HAS_CUDA, reason="runs the kernel under the interpreter")
@pytest.mark.parametrize("activation", ["identity", "relu", "leaky_relu", "gelu"])
def test_wgrad_by_torch_matches_the_kernel(activation):
    """On a GPU dW comes from wgrad_by_torch (linear_act.wgrad_kernel_on_gpu says why): here it
    gives the kernel's results from what each save mode keeps (nothing, the sign mask, act'), with
    and without db, on sizes that are not multiples of 8."""
    from fastnn.triton_kernels import linear_act as K
    act = activations.get(activation)
    mode = triton_backend._save_mode(act, True)
    x, w, b = make_inputs((37, 23), 19, torch.float32, "cpu", requires_grad=False)
    _, saved = K.forward(x, w, b, act.code, mode)
    dy = torch.randn(37, 19)
    leaky = activation == "leaky_relu"
    empty = K.wgrad_by_torch(dy[:0], saved[:0], mode, leaky, x[:0], True, True)
    assert torch.equal(empty[0], torch.zeros(19, 23)) and torch.equal(empty[1], torch.zeros(19))
    for need_db in (True, False):
        want = K.wgrad(dy, saved, mode, leaky, x, True, need_db)
        got = K.wgrad_by_torch(dy, saved, mode, leaky, x, True, need_db)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        assert (got[1] is None) == (not need_db)
        if need_db:
            torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["gelu-8192x1600x6400", "identity-8192x6400x1600"])
def test_autotuned_at_gpt2_xl_mlp_shapes(monkeypatch, case):
    """GPT-2 XL's fc1 and fc2 with autotuning on, as the benchmark runs them: on an H200 with
    Triton 3.6 the wgrad kernel's bf16 weight gradients came out far outside the rule here
    (2026-12-04); dW on a GPU now comes from torch's GEMM (wgrad_kernel_on_gpu)."""
    test_tuned_configs_on_gpu(monkeypatch, case)


@pytest.mark.gpu
@pytest.mark.xfail(reason="the wgrad kernel gave wrong bf16 dW for the identity here on an H200 with Triton 3.6 "
                          "(2026-12-04); its pipelining hazard was fixed after, not yet run on a GPU: see "
                          "wgrad_kernel_on_gpu (an XPASS here is the check that lets it back on)",
                   strict=False)
@pytest.mark.parametrize("index", range(4))
@pytest.mark.parametrize("case", ["gelu-8192x1600x6400", "identity-8192x6400x1600"])
def test_each_tuned_config_alone(monkeypatch, case, index):
    """Every kernel launched with config `index` of its tuned set (modulo the set's size), no
    autotuning: a config that computes wrong results fails here by name, where autotuning would
    hide which config served. The wgrad kernel runs too (FASTNN_TRITON_WGRAD=kernel)."""
    from fastnn.triton_kernels import linear_act as K
    sets = {K.linear_act_fwd_kernel: K.FWD_CONFIGS, K.linear_act_fwd_tma_kernel: K.TMA_CONFIGS,
            K.linear_splitk_kernel: K.SPLITK_CONFIGS, K.linear_act_dgrad_kernel: K.DGRAD_CONFIGS,
            K.linear_act_wgrad_kernel: K.WGRAD_CONFIGS}

    def pick(kernel, tuned):
        cfg = sets[kernel][index % len(sets[kernel])]
        return kernel, dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    monkeypatch.setattr(K, "pick", pick)
    monkeypatch.setenv("FASTNN_TRITON_WGRAD", "kernel")  # (the kernel is what is under test)
    activation, shape = case.split("-")
    m, k, n = map(int, shape.split("x"))
    x, w, b = make_inputs((m, k), n, torch.bfloat16, "cuda")
    check_against_reference(lambda x, w, b: _act(x, w, b, activation),
                            lambda x, w, b: torch_linear_act(x, w, b, activation), [x, w, b],
                            what=f"{case} config {index}")


@pytest.mark.gpu
def test_tma_forward_recomputed_on_autograd_thread():
    """A recomputing FusedMLP runs its forward again inside backward, on autograd's device thread:
    the TMA kernel's scratch allocator must be set there too (sm_90)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA tensor descriptors need sm90+")
    torch.manual_seed(0)
    mlp = fastnn.FusedMLP(256, 1024, activation="gelu", recompute=True, backend="triton").cuda().bfloat16()
    ref = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256)).cuda().bfloat16()
    ref.load_state_dict({"0.weight": mlp.fc1.weight, "0.bias": mlp.fc1.bias, "2.weight": mlp.fc2.weight,
                         "2.bias": mlp.fc2.bias})
    x = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    mlp(x).float().square().mean().backward()
    got = x.grad.clone()
    x.grad = None
    ref(x).float().square().mean().backward()
    torch.testing.assert_close(got, x.grad, atol=2e-2, rtol=5e-2)


def test_tma_decision_is_not_made_while_tracing(monkeypatch):
    """Under torch.compile the pointers are fakes (FunctionalTensor refuses data_ptr, fake tensors
    give 0): the TMA check answers False without reading them, so the pointer kernel is traced."""
    from fastnn.triton_kernels import linear_act as K
    monkeypatch.setattr(K, "interpreting", lambda: False)
    monkeypatch.setattr(K, "capability", lambda device: (9, 0))
    seen = []

    @torch.compile(fullgraph=True, backend="eager")
    def traced(x, w):
        seen.append(K._tma_ok(x, w, None))
        return x + 1

    x, w = torch.randn(16, 32), torch.randn(8, 32)
    traced(x, w)
    assert seen == [False]
    assert K._tma_ok(x, w, None) is (x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0)  # eagerly: the real check
    # nor in a fake kernel run (DTensor's sharding propagation runs the op on fake tensors)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fakes = mode.from_tensor(x), mode.from_tensor(w)
    assert K._tma_ok(*fakes, None) is False


@pytest.mark.parametrize("shape", [(1, 1, 1), (37, 45, 70), (65, 17, 129)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("activation", ["gelu", "relu", "leaky_relu", "identity"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_dgrad_with_act_epilogue(shape, activation, dtype):
    """The MLP block's hidden gradient from fc2's dgrad kernel with fc1's act' factor (the saved
    derivative, or the sign mask on column blocks not a multiple of 8 wide) as its epilogue,
    dZ1 = (dY @ W2) * act'(z1), against the same in PyTorch ops (float64)."""
    from fastnn.backends.triton import BACKEND
    rows, out, hidden = shape
    act = activations.get(activation)
    gen = torch.Generator().manual_seed(1)
    x, w1 = torch.randn(rows, 24, generator=gen), torch.randn(hidden, 24, generator=gen) / 5
    dy, w2 = torch.randn(rows, out, generator=gen), torch.randn(out, hidden, generator=gen) / 6
    x, w1, dy, w2 = (t.to(DEVICE, dtype) for t in (x, w1, dy, w2))
    _, saved = BACKEND.linear_act_fwd(x, w1, None, act, True)
    got = BACKEND.hidden_grad(dy, w2, saved, act)
    z = x.double() @ w1.double().t()
    want = (dy.double() @ w2.double()) * act.grad(z)
    assert got.dtype == dtype and got.shape == (rows, hidden)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
