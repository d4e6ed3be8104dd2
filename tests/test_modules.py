"""FusedLinear, FusedMLP and TransformerEncoderLayer against the torch modules they replace."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastnn
from fused_calls import fused_calls  # noqa: F401  (fixture)
from numerics import assert_within_2x


def _grads(module, x, g):
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y = module(x)
    y.backward(g)
    return y.detach(), x.grad, [p.grad.clone() for p in module.parameters()]


def _compare_modules(ours, ref, x, what):
    """Outputs and every gradient of two modules on the same input, within float32 rounding."""
    g = torch.randn_like(ref(x))
    y1, gx1, gp1 = _grads(ours, x, g)
    y2, gx2, gp2 = _grads(ref, x, g)
    torch.testing.assert_close(y1, y2, atol=2e-5, rtol=2e-5, msg=f"{what} output")
    torch.testing.assert_close(gx1, gx2, atol=2e-5, rtol=2e-5, msg=f"{what} input grad")
    assert len(gp1) == len(gp2)
    for i, (a, b) in enumerate(zip(gp1, gp2)):  # parameters in registration order
        torch.testing.assert_close(a, b, atol=5e-5, rtol=5e-5, msg=f"{what} grad of parameter {i}")


# ---- FusedLinear ---------------------------------------------------------------------------------
def test_fused_linear_is_nn_linear():
    torch.manual_seed(3)
    ref = nn.Linear(12, 7)
    torch.manual_seed(3)
    ours = fastnn.FusedLinear(12, 7, activation="silu")
    assert isinstance(ours, nn.Linear)
    assert list(ours.state_dict()) == ["weight", "bias"]
    torch.testing.assert_close(ours.weight, ref.weight)  # nn.Linear's init, same RNG draws
    assert "activation=silu" in repr(ours) and "in_features=12" in repr(ours)
    ours.load_state_dict(ref.state_dict())  # a plain nn.Linear checkpoint loads as is
    ref_seq = nn.Sequential(ref, nn.SiLU())
    _compare_modules(ours, ref_seq, torch.randn(5, 3, 12), "FusedLinear")
    ref.load_state_dict(ours.state_dict())  # and the other way round


def test_fused_linear_no_bias_and_unknown_activation():
    m = fastnn.FusedLinear(4, 3, bias=False, activation="relu")
    assert m.bias is None and list(m.state_dict()) == ["weight"]
    with pytest.raises(ValueError, match="unknown activation 'mish'"):
        fastnn.FusedLinear(4, 3, activation="mish")


def test_fused_linear_train_eval_autocast_meta():
    m = fastnn.FusedLinear(16, 8, activation="gelu")
    x = torch.randn(4, 16)
    m.eval()
    y_eval = m(x)
    m.train()
    torch.testing.assert_close(m(x), y_eval)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        y_ref = F.gelu(F.linear(x, m.weight, m.bias))
    assert y.dtype == torch.bfloat16 == y_ref.dtype
    torch.testing.assert_close(y.float(), y_ref.float(), atol=2e-2, rtol=2e-2)
    y.float().sum().backward()
    assert m.weight.grad.dtype == torch.float32  # the fp32 parameters get fp32 gradients
    meta = fastnn.FusedLinear(1024, 4096, device="meta")
    assert meta.weight.is_meta and meta(torch.empty(3, 1024, device="meta")).shape == (3, 4096)


# ---- FusedMLP ------------------------------------------------------------------------------------
def test_fused_mlp_layout_and_math():
    mlp = fastnn.FusedMLP(10, 24, activation="gelu")
    assert list(mlp.state_dict()) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert mlp.fc2.out_features == 10
    ref = nn.Sequential(nn.Linear(10, 24), nn.GELU(), nn.Linear(24, 10))
    ref.load_state_dict({k.replace("fc1", "0").replace("fc2", "2"): v for k, v in mlp.state_dict().items()})
    _compare_modules(mlp, ref, torch.randn(6, 10), "FusedMLP")


def test_fused_mlp_gated_layout():
    mlp = fastnn.FusedMLP(8, 16, out_features=5, activation="swiglu", bias=False)
    assert list(mlp.state_dict()) == ["fc1.gate_proj.weight", "fc1.up_proj.weight", "fc2.weight"]
    x = torch.randn(3, 8)
    g, u = mlp.fc1.gate_proj, mlp.fc1.up_proj
    ref = mlp.fc2(F.silu(g(x)) * u(x))
    torch.testing.assert_close(mlp(x), ref, atol=1e-5, rtol=1e-5)


def _saved_bytes(fn, inputs):
    seen = {}
    input_ptrs = {t.untyped_storage().data_ptr() for t in inputs}

    def pack(t):
        if t.untyped_storage().data_ptr() not in input_ptrs:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


@pytest.mark.parametrize("activation", ["gelu", "relu", "swiglu"])
def test_fused_mlp_recompute(activation):
    torch.manual_seed(0)
    mlp = fastnn.FusedMLP(32, 128, activation=activation, dropout=0.1)
    x = torch.randn(64, 32, requires_grad=True)
    params = list(mlp.parameters())
    grads = {}
    saved = {}
    for recompute in (False, True):
        mlp.recompute = recompute
        torch.manual_seed(1)  # same dropout mask both times
        y, saved[recompute] = _saved_bytes(lambda: mlp(x), [x, *params])
        grads[recompute] = torch.autograd.grad(y.square().sum(), [x, *params])
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b)
    assert saved[True] == 0  # only the block input (and the parameters) are kept
    hidden_bytes = 64 * 128 * 4
    assert saved[False] >= hidden_bytes  # at least the hidden activation fc2 reads


def test_fused_mlp_compile_fullgraph():
    torch._dynamo.reset()
    mlp = fastnn.FusedMLP(16, 48, activation="gelu_tanh")
    compiled = torch.compile(mlp, fullgraph=True)
    x = torch.randn(4, 9, 16)
    _compare_modules(compiled, mlp, x, "compiled FusedMLP")


# ---- TransformerEncoderLayer ---------------------------------------------------------------------
LAYER_CASES = [
    dict(batch_first=True, norm_first=False, activation="relu"),
    dict(batch_first=False, norm_first=True, activation="gelu"),
    dict(batch_first=True, norm_first=True, activation=F.gelu, bias=False),
    dict(batch_first=True, norm_first=False, activation=nn.GELU(approximate="tanh")),
    dict(batch_first=True, norm_first=False, activation=lambda t: t * torch.sigmoid(1.7 * t)),  # unknown: unfused
]


def _layers(**kw):
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, **kw)
    ours = fastnn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, **kw)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    return ours, ref


@pytest.mark.parametrize("kw", LAYER_CASES, ids=lambda k: "-".join(f"{a}={getattr(b, '__name__', b)}" for a, b in k.items()))
def test_encoder_layer_matches_torch(kw):
    ours, ref = _layers(**kw)
    shape = (3, 7, 32) if kw["batch_first"] else (7, 3, 32)
    _compare_modules(ours, ref, torch.randn(shape), "encoder layer")


def test_encoder_layer_masks_and_causal():
    ours, ref = _layers(batch_first=True)
    x = torch.randn(2, 6, 32)
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    padding = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    for kwargs in (dict(src_mask=causal, is_causal=True), dict(src_key_padding_mask=padding),
                   dict(src_mask=causal.bool() if causal.dtype != torch.bool else causal, src_key_padding_mask=padding)):
        y1 = ours(x, **kwargs)
        y2 = ref(x, **kwargs)
        torch.testing.assert_close(y1, y2, atol=2e-5, rtol=2e-5)


def test_encoder_stack_eval_and_nested_tensors(fused_calls):
    """In a TransformerEncoder with nested tensors (torch's default) in eval, torch's own fast
    path runs, as with torch's layer; in training the fused feed-forward runs with live dropout."""
    layer = fastnn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.1, batch_first=True)
    enc = nn.TransformerEncoder(layer, num_layers=2)
    ref_layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.1, batch_first=True)
    ref = nn.TransformerEncoder(ref_layer, num_layers=2)
    ref.load_state_dict(enc.state_dict())
    ref_layer.load_state_dict(layer.state_dict())
    for m in (enc, ref, layer, ref_layer):
        m.eval()
    x = torch.randn(2, 5, 32)
    padding = torch.tensor([[False] * 5, [False, False, False, True, True]])
    with torch.no_grad():
        torch.testing.assert_close(enc(x, src_key_padding_mask=padding), ref(x, src_key_padding_mask=padding),
                                   atol=2e-5, rtol=2e-5)
        nested = torch.nested.nested_tensor([torch.randn(3, 32), torch.randn(5, 32)])
        for a, b in zip(layer(nested).unbind(), ref_layer(nested).unbind()):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
    enc.train()
    assert not torch.equal(enc(x), enc(x))  # dropout is live in training
    assert fused_calls["linear_act"] == 4


def test_encoder_layer_is_torchs_around_the_feed_forward():
    ours, ref = _layers(batch_first=True, activation="gelu")
    x = torch.randn(2, 6, 32)
    # hooks on self_attn fire, and a replaced self_attn is the one that runs
    seen = []
    ours.self_attn.register_forward_hook(lambda m, i, o: seen.append(1))
    torch.testing.assert_close(ours(x), ref(x), atol=2e-5, rtol=2e-5)
    assert seen == [1]
    ours.self_attn = ref.self_attn = nn.MultiheadAttention(32, 2, batch_first=True)
    torch.testing.assert_close(ours(x), ref(x), atol=2e-5, rtol=2e-5)
    # unbatched (S, E) input, documented by torch
    torch.testing.assert_close(ours(x[0]), ref(x[0]), atol=2e-5, rtol=2e-5)
    # masks: torch's rules and torch's errors
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    torch.testing.assert_close(ours(x, src_mask=causal, is_causal=True), ref(x, src_mask=causal, is_causal=True),
                               atol=2e-5, rtol=2e-5)
    for kwargs in (dict(src_key_padding_mask=torch.zeros(2, 6, dtype=torch.int64)),
                   dict(src_key_padding_mask=torch.zeros(2, 6, dtype=torch.uint8)), dict(is_causal=True)):
        try:
            expected = ref(x, **kwargs)
        except Exception as e:  # noqa: BLE001  (whatever torch raises, fastnn raises the same)
            with pytest.raises(type(e)) as ours_error:
                ours(x, **kwargs)
            assert str(ours_error.value) == str(e)
        else:
            torch.testing.assert_close(ours(x, **kwargs), expected, atol=2e-5, rtol=2e-5)


def test_encoder_layer_scripts():
    ours, ref = _layers(batch_first=True, activation="gelu")
    scripted = torch.jit.script(ours)
    x = torch.randn(2, 6, 32)
    torch.testing.assert_close(scripted(x), ref(x), atol=2e-5, rtol=2e-5)


def test_encoder_layer_compile_fullgraph():
    torch._dynamo.reset()
    ours, ref = _layers(batch_first=True, activation="gelu")
    compiled = torch.compile(ours, fullgraph=True)
    _compare_modules(compiled, ref, torch.randn(2, 5, 32), "compiled encoder layer")


def test_encoder_layer_bf16_close_to_torch():
    ours, ref = _layers(batch_first=True, activation="gelu")
    ours, ref = ours.to(torch.bfloat16), ref.to(torch.bfloat16)
    x = torch.randn(2, 8, 32)
    with torch.no_grad():
        y_ref64 = copy.deepcopy(ref).double()(x.bfloat16().double())  # the same bf16 weights, in float64
        assert_within_2x("bf16 encoder layer", ours(x.bfloat16()), ref(x.bfloat16()), y_ref64)


def test_modules_on_meta_and_under_autocast():
    mlp = fastnn.FusedMLP(64, 256, activation="swiglu", device="meta")
    layer = fastnn.TransformerEncoderLayer(64, 4, dim_feedforward=128, batch_first=True, device="meta")
    assert all(p.is_meta for p in [*mlp.parameters(), *layer.parameters()])
    assert mlp(torch.empty(2, 5, 64, device="meta")).shape == (2, 5, 64)
    assert layer(torch.empty(2, 5, 64, device="meta")).shape == (2, 5, 64)
    mlp = fastnn.FusedMLP(16, 32, activation="gelu")
    x = torch.randn(3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mlp(x)
        ref = mlp.fc2(F.gelu(F.linear(x, mlp.fc1.weight, mlp.fc1.bias)))
    assert y.dtype == torch.bfloat16 == ref.dtype
    torch.testing.assert_close(y.float(), ref.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_mlp_projections_wrapped_or_hooked_run_unfused(activation, fused_calls):
    """A hook on a projection sees what it would see unfused (the pre-activation), and a LoRA
    adapter on it counts: the block runs through the projection modules then."""
    mlp = fastnn.FusedMLP(8, 16, activation=activation)
    op = "linear_glu" if activation == "swiglu" else "linear_act"
    proj = mlp.fc1.gate_proj if activation == "swiglu" else mlp.fc1
    x = torch.randn(3, 8)

    def unfused(m):
        if activation == "swiglu":
            return m.fc2(F.silu(m.fc1.gate_proj(x)) * m.fc1.up_proj(x))
        return m.fc2(F.gelu(m.fc1(x)))

    expected = unfused(mlp).detach()
    assert fused_calls[op] == 0
    torch.testing.assert_close(mlp(x), expected, atol=1e-5, rtol=1e-5)
    assert fused_calls[op] == 1
    captured = []
    handle = proj.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    torch.testing.assert_close(mlp(x), expected, atol=1e-5, rtol=1e-5)
    assert fused_calls[op] == 1 and len(captured) == 1
    torch.testing.assert_close(captured[0], F.linear(x, proj.weight, proj.bias))
    handle.remove()
    peft = pytest.importorskip("peft")
    torch.manual_seed(3)
    target = ["gate_proj"] if activation == "swiglu" else ["fc1"]
    lora = peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=target, init_lora_weights=False),
                                        copy.deepcopy(mlp))
    torch.testing.assert_close(lora(x), unfused(lora), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(lora(x), expected, atol=1e-4)  # the adapter changes the result
    assert fused_calls[op] == 1


def test_fused_mlp_memory_levels():
    """recompute names fastnn.mlp's levels too: what backward keeps shrinks level by level, the
    gradients stay the same; an unknown level is a clear error."""
    torch.manual_seed(0)
    mlp = fastnn.FusedMLP(16, 64, activation="gelu")
    x = torch.randn(32, 16, requires_grad=True)
    kept, grads = {}, {}
    for level in (False, "activation", True):
        mlp.recompute = level
        total = 0

        def pack(t):
            nonlocal total
            if not isinstance(t, torch.nn.Parameter) and t is not x:
                total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = mlp(x)
        kept[level] = total
        grads[level] = torch.autograd.grad(y.square().sum(), [x, *mlp.parameters()])
    # (and fc1's bias, 64 elements, where the cpu backend's saved product lacks it: cpu.f32_bias_in_pass)
    reads_bias = fastnn.backends.BACKENDS["cpu"].backward_reads_bias(torch.float32, fastnn.activations.get("gelu"))
    bias = 64 * 4 * reads_bias
    assert kept[False] == 2 * 32 * 64 * 4 + bias, kept
    assert kept["activation"] == 32 * 64 * 4 + bias, kept
    assert kept[True] == 64 * 4, kept  # fc1's bias as the forward saw it: backward runs fc1 again
    for g in (grads["activation"], grads[True]):
        for a, b in zip(g, grads[False]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="recompute must be True, False or one of"):
        fastnn.FusedMLP(16, 64, recompute="all")


@pytest.mark.parametrize("which", ["mlp-gelu", "mlp-swiglu", "encoder"])
def test_global_module_hooks_see_the_unfused_calls(which, fused_calls):
    """A hook registered for every module (register_module_forward_hook: profilers, activation
    statistics) fires for each submodule call an unfused model makes, fc1 included, with fc1's
    pre-activation: while one exists, fastnn's modules run unfused."""
    torch.manual_seed(0)
    if which == "encoder":
        ours = fastnn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        reference = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        reference.load_state_dict(ours.state_dict())
        x = torch.randn(2, 3, 8)
    else:
        ours = fastnn.FusedMLP(8, 16, activation=which.split("-")[1])
        reference = None
        x = torch.randn(3, 8)
    ours.train()

    def record(model):
        seen = []
        handle = torch.nn.modules.module.register_module_forward_hook(
            lambda m, i, o: seen.append((type(m).__name__, o.detach().clone() if isinstance(o, torch.Tensor) else None)))
        try:
            y = model(x)
        finally:
            handle.remove()
        return y, seen

    y, seen = record(ours)
    assert sum(fused_calls.values()) == 0
    names = [n for n, _ in seen]
    if which == "encoder":
        y_ref, seen_ref = record(reference)
        torch.testing.assert_close(y, y_ref)
        assert names[:-1] == [n for n, _ in seen_ref][:-1]
        linear1 = names.index("Linear")  # linear1's output: the pre-activation, as torch's layer shows it
        torch.testing.assert_close(seen[linear1][1], seen_ref[linear1][1])
    else:
        gated = which.endswith("swiglu")
        assert names == (["Linear", "Linear", "GatedLinear"] if gated else ["Linear"]) + ["Dropout", "Linear", "FusedMLP"]
        fc1 = ours.fc1.gate_proj if gated else ours.fc1
        fc1_out = F.linear(x, fc1.weight, fc1.bias)
        torch.testing.assert_close(seen[0][1], fc1_out)
    # with the hook gone, fused again
    ours(x)
    assert sum(fused_calls.values()) >= 1
