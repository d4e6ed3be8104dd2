"""fastnn.mlp, the MLP block as one call: every activation (gated ones too) against its PyTorch
composite in outputs and every gradient, at both memory levels; dropout with PyTorch's semantics
and random stream; what each level keeps for backward; bad arguments."""
import pytest
import torch
import torch.nn.functional as F

import fastnn
from fastnn import activations
from cases import STANDIN
from numerics import check_against_reference

# (the cuda backend on CPU tensors through the stand-in for fastnn._cuda: tests/cuda_standin.py)
BACKENDS = ["cpu", "torch", pytest.param("cuda", marks=STANDIN, id="cuda-standin")]
LEVELS = list(fastnn.functional.RECOMPUTE_LEVELS)


def _weights(k, hidden, n, dtype, gated, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def param(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).requires_grad_()

    w1, w2 = param(hidden, k, scale=k ** -0.5), param(n, hidden, scale=hidden ** -0.5)
    b1, b2 = (param(hidden), param(n)) if bias else (None, None)
    wu, bu = (param(hidden, k, scale=k ** -0.5), param(hidden) if bias else None) if gated else (None, None)
    return w1, b1, w2, b2, wu, bu


def _eager(x, w1, b1, w2, b2, wu, bu, activation):
    if wu is not None:
        h = activations.get_gated(activation).fn(F.linear(x, w1, b1)) * F.linear(x, wu, bu)
    else:
        h = activations.get(activation).fn(F.linear(x, w1, b1))
    return F.linear(h, w2, b2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recompute", LEVELS)
@pytest.mark.parametrize("activation", list(fastnn.ACTIVATIONS) + list(fastnn.GATED))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mlp_matches_composite(backend, recompute, activation, dtype):
    gated = activation in fastnn.GATED
    x = torch.randn(3, 17, 24).to(dtype).requires_grad_()
    w1, b1, w2, b2, wu, bu = _weights(24, 65, 20, dtype, gated)
    if gated:
        check_against_reference(
            lambda x, w1, b1, w2, b2, wu, bu: fastnn.mlp(x, w1, b1, w2, b2, activation, up_weight=wu, up_bias=bu,
                                                         recompute=recompute, backend=backend),
            lambda x, w1, b1, w2, b2, wu, bu: _eager(x, w1, b1, w2, b2, wu, bu, activation),
            [x, w1, b1, w2, b2, wu, bu], what=f"{activation} {recompute}")
    else:
        check_against_reference(
            lambda x, w1, b1, w2, b2: fastnn.mlp(x, w1, b1, w2, b2, activation, recompute=recompute, backend=backend),
            lambda x, w1, b1, w2, b2: _eager(x, w1, b1, w2, b2, None, None, activation),
            [x, w1, b1, w2, b2], what=f"{activation} {recompute}")


def test_mlp_without_biases_and_frozen_weights():
    x = torch.randn(9, 16, requires_grad=True)
    w1, b1, w2, b2, _, _ = _weights(16, 32, 8, torch.float32, False, bias=False)
    w1.requires_grad_(False)
    check_against_reference(lambda x, w1, w2: fastnn.mlp(x, w1, None, w2, None, "relu", recompute="fc1"),
                            lambda x, w1, w2: _eager(x, w1, None, w2, None, None, None, "relu"), [x, w1, w2])


@pytest.mark.parametrize("recompute", ["none", "fc1"])
def test_dropout_follows_pytorch(recompute):
    """Same seed, same masks as F.dropout in the eager block; the recomputed backward replays them;
    no dropout when not training."""
    x = torch.randn(32, 16, requires_grad=True)
    w1, b1, w2, b2, _, _ = _weights(16, 64, 8, torch.float32, False)
    torch.manual_seed(5)
    y = fastnn.mlp(x, w1, b1, w2, b2, "gelu", dropout=0.5, recompute=recompute)
    y.sum().backward()
    ours = [t.grad.clone() for t in (x, w1, b1, w2, b2)]
    for t in (x, w1, b1, w2, b2):
        t.grad = None
    torch.manual_seed(5)
    ref = F.linear(F.dropout(F.gelu(F.linear(x, w1, b1)), 0.5, True), w2, b2)
    ref.sum().backward()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    for a, t in zip(ours, (x, w1, b1, w2, b2)):
        torch.testing.assert_close(a, t.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        evaluated = fastnn.mlp(x, w1, b1, w2, b2, "gelu", dropout=0.5, training=False)
        torch.testing.assert_close(evaluated, F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2), rtol=1e-5, atol=1e-5)


def _saved_bytes(fn, params):
    """Bytes of the tensors autograd keeps for backward, the parameters (kept anyway) left out."""
    total = 0
    param_ptrs = {t.data_ptr() for t in params if t is not None}

    def pack(t):
        nonlocal total
        if t.data_ptr() not in param_ptrs:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["gelu", "relu", "swiglu"])
def test_memory_levels(backend, activation):
    """"none" keeps fc1's saved tensor and the hidden activation; "activation" the pre-activation(s)
    alone (relu: its mask and h, as "none"); "fc1" keeps x alone (and fc1's biases)."""
    gated = activation in fastnn.GATED
    m, k, hidden = 64, 32, 256
    x = torch.randn(m, k, requires_grad=True)
    w1, b1, w2, b2, wu, bu = _weights(k, hidden, k, torch.float32, gated)
    run = {level: _saved_bytes(lambda: fastnn.mlp(x, w1, b1, w2, b2, activation, up_weight=wu, up_bias=bu,
                                                  recompute=level, backend=backend), (w1, b1, w2, b2, wu, bu))
           for level in LEVELS}
    x_bytes = m * k * 4
    hidden_bytes = m * hidden * 4
    mask = m * hidden // 8 if backend != "torch" else hidden_bytes  # the torch backend keeps z itself
    fc1_saved = {"gelu": hidden_bytes, "relu": mask, "swiglu": 2 * hidden_bytes}[activation]
    # and a copy of fc1's biases where the backend's saved product lacks them (fastnn/autograd.py, keep_bias)
    act = activations.get_gated(activation) if gated else activations.get(activation)
    reads = fastnn.backends.BACKENDS[backend].backward_reads_bias
    fc1_saved += hidden * 4 * (reads(torch.float32, act) + (gated and reads(torch.float32, None)))
    assert run["none"] == x_bytes + fc1_saved + hidden_bytes, run
    assert run["activation"] == x_bytes + fc1_saved + (hidden_bytes if activation == "relu" else 0), run
    # fc1: x, and a copy of fc1's biases (backward runs fc1 again with the forward's)
    assert run["fc1"] == x_bytes + hidden * 4 * (1 + gated), run


@pytest.mark.parametrize("backend,device", [("cpu", "cpu"), pytest.param("cuda", "cpu", marks=STANDIN, id="cuda-standin"),
                                            pytest.param("cuda", "cuda", marks=pytest.mark.gpu, id="cuda")])
@pytest.mark.parametrize("activation", ["gelu", "silu", "swiglu", "geglu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_levels_give_the_same_bits(backend, device, activation, dtype):
    """On the cpu and cuda backends the "activation" level rebuilds h with the forward's own pass
    over the kept pre-activation (not PyTorch ops on a plain GEMM's output), and the "fc1" level
    runs fc1 again by the forward's own call: every gradient is bit for bit the "none" level's."""
    gated = activation in fastnn.GATED
    x = torch.randn(70, 24).to(dtype).to(device).requires_grad_()
    w1, b1, w2, b2, wu, bu = (None if t is None else t.detach().to(device).requires_grad_()
                              for t in _weights(24, 96, 20, dtype, gated))
    leaves = [t for t in (x, w1, b1, w2, b2, wu, bu) if t is not None]
    dy = torch.randn(70, 20).to(dtype).to(device)
    assert fastnn.backends.BACKENDS[backend].rebuilds_hidden(
        activations.get_gated(activation) if gated else activations.get(activation), gated)
    grads = {}
    for level in LEVELS:
        y = fastnn.mlp(x, w1, b1, w2, b2, activation, up_weight=wu, up_bias=bu, recompute=level, backend=backend)
        grads[level] = (y, *torch.autograd.grad(y, leaves, dy))
    for level in ("activation", "fc1"):
        for a, b in zip(grads["none"], grads[level]):
            assert torch.equal(a, b), level


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reentrant_checkpoint_sees_the_same_bits(dtype):
    """Reentrant checkpointing (transformers' gradient_checkpointing default) runs the block under
    no_grad, then again with grad in backward: the two must agree bit for bit, as in eager
    PyTorch, or the gradients mix two slightly different forwards."""
    from torch.utils.checkpoint import checkpoint

    for activation in ("gelu", "relu", "swiglu", "reglu"):
        w1, b1, w2, b2, wu, bu = _weights(24, 40, 24, dtype, activation in fastnn.GATED)
        params = [t for t in (w1, b1, w2, b2, wu, bu) if t is not None]
        for level in LEVELS:
            def block(x):
                return fastnn.mlp(x, w1, b1, w2, b2, activation, up_weight=wu, up_bias=bu, recompute=level,
                                  backend="cpu")

            x = torch.randn(37, 24).to(dtype).requires_grad_()
            with torch.no_grad():
                plain = block(x)
            assert torch.equal(block(x).detach(), plain), (activation, level)
            grads = []
            for f in (block, lambda x: checkpoint(block, x, use_reentrant=True)):
                for t in (x, *params):
                    t.grad = None
                f(x).float().square().sum().backward()  # (reentrant checkpointing refuses .grad())
                grads.append([t.grad for t in (x, *params)])
            for a, c in zip(*grads):
                assert torch.equal(a, c), (activation, level)


def test_block_op_where_it_runs():
    """Eagerly, needing gradients and without dropout in training, the block is one autograd op;
    dropout in training composes PyTorch's dropout; without gradients nothing is saved."""
    x = torch.randn(6, 8, requires_grad=True)
    w1, b1, w2, b2, _, _ = _weights(8, 16, 4, torch.float32, False)
    assert type(fastnn.mlp(x, w1, b1, w2, b2, "gelu").grad_fn).__name__ == "MlpFunctionBackward"
    assert type(fastnn.mlp(x, w1, b1, w2, b2, "gelu", dropout=0.1, training=False).grad_fn).__name__ \
        == "MlpFunctionBackward"
    assert type(fastnn.mlp(x, w1, b1, w2, b2, "gelu", dropout=0.1).grad_fn).__name__ != "MlpFunctionBackward"
    with torch.no_grad():
        assert fastnn.mlp(x, w1, b1, w2, b2, "gelu").grad_fn is None


@pytest.mark.parametrize("recompute", LEVELS)
def test_torch_func_through_the_block(recompute):
    """vmap / jacrev run PyTorch's composite; a backward vmapped over its grad outputs
    (jacobian(vectorize=True)) goes through the block op's composite backward."""
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    w1, b1, w2, b2, wu, bu = _weights(8, 12, 3, torch.float64, True)

    def ours(x):
        return fastnn.mlp(x, w1, b1, w2, b2, "swiglu", up_weight=wu, up_bias=bu, recompute=recompute)

    def ref(x):
        return _eager(x, w1, b1, w2, b2, wu, bu, "swiglu")

    expected = torch.autograd.functional.jacobian(ref, x)
    torch.testing.assert_close(torch.autograd.functional.jacobian(ours, x, vectorize=True), expected)
    torch.testing.assert_close(torch.func.jacrev(ours)(x), expected)
    torch.testing.assert_close(torch.func.vmap(ours)(x.unsqueeze(1)).squeeze(1), ref(x))


def test_mlp_errors():
    x = torch.randn(4, 8)
    w1, b1, w2, b2, wu, bu = _weights(8, 16, 8, torch.float32, True)
    with pytest.raises(ValueError, match="needs up_weight"):
        fastnn.mlp(x, w1, b1, w2, b2, "swiglu")
    with pytest.raises(ValueError, match="for gated activations"):
        fastnn.mlp(x, w1, b1, w2, b2, "gelu", up_weight=wu)
    with pytest.raises(ValueError, match="unknown recompute level 'all'"):
        fastnn.mlp(x, w1, b1, w2, b2, "gelu", recompute="all")
    with pytest.raises(ValueError, match="between 0 and 1"):
        fastnn.mlp(x, w1, b1, w2, b2, "gelu", dropout=1.5)
    with pytest.raises(ValueError, match="fc2_weight has 7 in_features"):
        fastnn.mlp(x, w1, b1, torch.randn(8, 7), b2, "gelu")
    with pytest.raises(ValueError, match="unknown activation"):
        fastnn.mlp(x, w1, b1, w2, b2, "gleu")
    with pytest.raises(TypeError, match="fc2_weight is torch.float64"):
        fastnn.mlp(x, w1, b1, w2.double(), b2, "gelu")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("recompute", LEVELS)
@pytest.mark.parametrize("activation", ["gelu", "relu", "gelu_tanh", "swiglu"])
def test_mlp_block_on_gpu(backend, recompute, activation):
    """The block op on a GPU backend (fc2 and the hidden gradient there too), bfloat16, each level."""
    gated = activation in fastnn.GATED
    x = torch.randn(4, 33, 64, device="cuda").bfloat16().requires_grad_()
    w1, b1, w2, b2, wu, bu = (None if t is None else t.detach().cuda().requires_grad_()
                              for t in _weights(64, 136, 40, torch.bfloat16, gated))
    inputs = [x, w1, b1, w2, b2, wu, bu] if gated else [x, w1, b1, w2, b2]
    check_against_reference(
        lambda x, w1, b1, w2, b2, wu=None, bu=None: fastnn.mlp(x, w1, b1, w2, b2, activation, up_weight=wu,
                                                               up_bias=bu, recompute=recompute, backend=backend),
        lambda x, w1, b1, w2, b2, wu=None, bu=None: _eager(x, w1, b1, w2, b2, wu, bu, activation),
        inputs, what=f"{backend} {activation} {recompute}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("activation", ["relu", "gelu_tanh"])
@pytest.mark.parametrize("hidden", [3072, 250])
def test_mlp_hidden_grad_epilogue_on_cuda(dtype, activation, hidden):
    """The cuda block's hidden gradient from fc2's dgrad GEMM with cuBLASLt's DRELU_BGRAD /
    DGELU_BGRAD epilogue, where its probe trusts it (a hidden size off cuBLASLt's alignment may
    find no algorithm: fastnn's kernel then): the block's gradients follow the rule either way,
    and the epilogue serves only where it was trusted."""
    from fastnn.backends import cuda as cuda_backend
    cuda_backend.reset_paths()
    x = torch.randn(300, 128, device="cuda").to(dtype).requires_grad_()
    w1, b1, w2, b2, _, _ = (None if t is None else t.detach().cuda().requires_grad_()
                            for t in _weights(128, hidden, 96, dtype, False))
    check_against_reference(lambda x, w1, b1, w2, b2: fastnn.mlp(x, w1, b1, w2, b2, activation, backend="cuda"),
                            lambda x, w1, b1, w2, b2: _eager(x, w1, b1, w2, b2, None, None, activation),
                            [x, w1, b1, w2, b2], what=f"cuda block {activation} {dtype} hidden={hidden}")
    epilogue = "DRELU_BGRAD" if activation == "relu" else "DGELU_BGRAD"
    name = str(dtype).replace("torch.", "")
    served = cuda_backend.paths().get(("mlp_hidden_grad", name, activation), {})
    trusted = cuda_backend.epilogue_trust().get((torch.cuda.current_device(), name, epilogue))
    print(f"{epilogue} {name} hidden={hidden}: trusted={trusted}, served={served}")
    assert trusted is not None  # the probe ran
    assert not served or trusted
