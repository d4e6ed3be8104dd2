"""fastnn.fuse: the patterns it fuses, what it leaves alone, and that the fused model is the same
model to everything around it (train/eval, hooks, wrappers such as LoRA, offloading, pickling)."""
import copy
import importlib
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastnn
from fastnn.dropin import FusedCall, ReplicateForDataParallel, UnfuseForScripting
from fused_calls import fuse_module
from fused_calls import fused_calls  # noqa: F401  (fixture)


def _outputs_and_grads(model, *inputs, **kwargs):
    model.zero_grad(set_to_none=True)
    y = model(*inputs, **kwargs)
    y = y if isinstance(y, torch.Tensor) else y[0]
    y.float().square().sum().backward()
    return y.detach(), [p.grad.clone() if p.grad is not None else None for p in model.parameters()]


def _assert_grads_close(g1, g2, atol, rtol):
    """The fused model's parameter gradients g2 as the reference's g1 (None where they are None)."""
    assert len(g1) == len(g2)
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, atol=atol, rtol=rtol)


def _assert_same(reference, fused, *inputs, atol=2e-5, **kwargs):
    y1, g1 = _outputs_and_grads(reference, *inputs, **kwargs)
    y2, g2 = _outputs_and_grads(fused, *inputs, **kwargs)
    torch.testing.assert_close(y2, y1, atol=atol, rtol=atol)
    _assert_grads_close(g1, g2, atol * 4, atol * 4)


ACT_MODULES = [nn.ReLU(), nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.Sigmoid(), nn.Tanh(), nn.LeakyReLU()]


@pytest.mark.parametrize("act", ACT_MODULES, ids=lambda m: repr(m))
def test_sequential_patterns(act, fused_calls):
    model = nn.Sequential(nn.Linear(12, 20), act, nn.Linear(20, 6))
    reference = copy.deepcopy(model)
    children = list(model.children())
    keys = list(model.state_dict())
    fastnn.fuse(model)
    assert list(model.children()) == children and type(model[0]) is nn.Linear  # nothing swapped
    assert list(model.state_dict()) == keys
    _assert_same(reference, model, torch.randn(5, 12))
    assert fused_calls["linear_act"] == 1
    assert any(r.fused and r.path == "0" for r in model.fastnn_fuse_report)
    assert model[0](torch.ones(1, 12)).shape == (1, 20)  # the Linear alone is still a Linear


def test_left_alone():
    model = nn.Sequential(nn.Linear(4, 4), nn.LeakyReLU(0.2), nn.Linear(4, 4), nn.Softplus(), nn.Linear(4, 4),
                          nn.Dropout(0.1), nn.ReLU())
    fastnn.fuse(model)
    assert "forward" not in model.__dict__  # no pair to fuse: nothing installed
    left = {r.path: r.detail for r in model.fastnn_fuse_report if not r.fused}
    assert "slope 0.2" in left["0"] and "Softplus" in left["2"]


def test_optimizer_and_tied_weights_keep_working():
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Tanh())  # the same Linear twice (tied)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built before fuse
    fastnn.fuse(model)
    before = shared.weight.detach().clone()
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    assert not torch.equal(shared.weight, before)  # the optimiser still updates the shared parameter


def test_hooks_on_inner_modules_fire_and_disable_fusion(fused_calls):
    model = nn.Sequential(nn.Linear(6, 10), nn.GELU(), nn.Linear(10, 3))
    reference = copy.deepcopy(model)
    fastnn.fuse(model)
    seen = []
    handle = model[0].register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    x = torch.randn(4, 6)
    _assert_same(reference, model, x)
    assert len(seen) == 1 and fused_calls["linear_act"] == 0  # pre-activation captured: ran unfused
    torch.testing.assert_close(seen[0], reference[0](x))
    handle.remove()
    model(x)
    assert fused_calls["linear_act"] == 1  # fused again once the hook is gone
    act_hook = model[1].register_forward_pre_hook(lambda m, i: None)
    model(x)
    assert fused_calls["linear_act"] == 1
    act_hook.remove()
    outer = []
    model.register_forward_hook(lambda m, i, o: outer.append(o))  # on the fused module itself: fires, fused
    model(x)
    assert len(outer) == 1 and fused_calls["linear_act"] == 2


def test_global_hooks_disable_fusion(fused_calls):
    model = fastnn.fuse(nn.Sequential(nn.Linear(6, 10), nn.SiLU()))
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    try:
        model(torch.randn(2, 6))
    finally:
        handle.remove()
    assert seen == ["Linear", "SiLU", "Sequential"] and fused_calls["linear_act"] == 0


def test_bad_inputs_give_torchs_errors():
    model = fastnn.fuse(nn.Sequential(nn.Linear(6, 10), nn.ReLU()))
    reference = nn.Sequential(nn.Linear(6, 10), nn.ReLU())
    for bad in (torch.randn(2, 5), torch.randn(2, 6, dtype=torch.float64), torch.tensor(1.0)):
        with pytest.raises(RuntimeError) as theirs:
            reference(bad)
        with pytest.raises(RuntimeError) as ours:
            model(bad)
        assert str(ours.value) == str(theirs.value)


def test_fuse_root_twice_unfuse_pickle(fused_calls):
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True, activation="gelu")
    reference = copy.deepcopy(layer)
    assert fastnn.fuse(layer) is layer  # a bare pattern is fused in place too
    assert isinstance(layer.__dict__["_ff_block"], FusedCall)
    fastnn.fuse(layer)
    assert not layer.fastnn_fuse_report  # nothing more the second time
    x = torch.randn(2, 5, 16)
    _assert_same(reference, layer, x)
    assert fused_calls["linear_act"] == 1
    buffer = io.BytesIO()
    torch.save(layer, buffer)  # whole-module pickling, as torch.save(model) users do
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for clone in (loaded, copy.deepcopy(layer)):
        assert clone.__dict__["_ff_block"].module is clone
        assert clone.__dict__["_replicate_for_data_parallel"].module is clone
        _assert_same(reference, clone, x)
    assert fused_calls["linear_act"] == 3
    fastnn.unfuse(layer)
    assert not {"_ff_block", "_replicate_for_data_parallel", "__prepare_scriptable__"} & set(layer.__dict__)
    torch.jit.script(layer)  # torch's own layer again


class _Block(nn.Module):
    """A model around fused parts: a Sequential, a TransformerEncoderLayer, and a module with a
    __prepare_scriptable__ of its own on the instance."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=24, dropout=0.0, batch_first=True,
                                                activation="relu")
        self.head = nn.Sequential(nn.Linear(16, 8), nn.Tanh())
        self.prepared = []
        self.head.__prepare_scriptable__ = lambda: self.prepared.append(1) or self.head

    def forward(self, x):
        return self.head(self.layer(self.mlp(x)))


def test_torch_jit_script_of_a_fused_model(fused_calls):
    """torch.jit.script compiles classes' own methods: a fused model scripts to torch's unfused one
    (fastnn's calls come off each module before TorchScript compiles it; an instance's own
    __prepare_scriptable__ still runs), and the eager model keeps giving the same results; fuse
    fuses it again."""
    model = _Block().eval()
    reference = copy.deepcopy(model)
    fastnn.fuse(model)
    assert isinstance(model.head.__dict__["__prepare_scriptable__"], UnfuseForScripting)
    x = torch.randn(3, 5, 16)
    scripted = torch.jit.script(model)
    assert model.prepared == [1] and not isinstance(model.head.__dict__["__prepare_scriptable__"], UnfuseForScripting)
    assert not any(isinstance(v, (FusedCall, UnfuseForScripting)) for m in model.modules() for v in m.__dict__.values())
    fused_calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), reference(x), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(model(x), reference(x), atol=1e-6, rtol=1e-6)
    assert not fused_calls
    fastnn.fuse(model)
    # (with grad: under no_grad the encoder layer takes torch's native fast path, which fuses nothing)
    torch.testing.assert_close(model(x), reference(x), atol=2e-5, rtol=2e-5)
    assert fused_calls["linear_act"] == 3


def test_encoder_layer_eval_dropout_and_hooks(fused_calls):
    """fuse on a model in eval keeps it in eval (no attention dropout at inference) and keeps the
    layer's hooks; train() later switches dropout on as in torch."""
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.3, batch_first=True,
                                                           activation="gelu"), 2, enable_nested_tensor=False)
    enc.eval()
    reference = copy.deepcopy(enc)
    seen = []
    enc.layers[0].register_forward_hook(lambda m, i, o: seen.append(1))
    fastnn.fuse(enc)
    assert not any(m.training for m in enc.modules())
    x = torch.randn(3, 5, 16, requires_grad=True)
    y1, y2 = enc(x), enc(x)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    torch.testing.assert_close(y1, reference(x), atol=2e-5, rtol=2e-5)
    assert len(seen) == 2 and fused_calls["linear_act"] == 4
    enc.train()
    assert not torch.equal(enc(x), enc(x))


def test_fused_model_compiles_fullgraph():
    """torch.compile traces through the installed methods: one graph, with fastnn's op in it."""
    torch._dynamo.reset()
    targets = []

    def backend(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes)
        return gm

    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True, activation="gelu")
    model = nn.Sequential(nn.Linear(16, 16), nn.SiLU(), layer)
    reference = copy.deepcopy(model)
    fastnn.fuse(model)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    _assert_same(reference, compiled, torch.randn(2, 5, 16))
    assert sum("fastnn" in t for t in targets) == 2, [t for t in targets if "fastnn" in t or "linear" in t]


# ---- Hugging Face transformers (random weights from small configs: nothing is downloaded) -------
transformers = pytest.importorskip("transformers")

_COMMON = dict(vocab_size=100)


def _causal(model_cls, cfg):
    torch.manual_seed(0)
    return model_cls(cfg).eval()


# name -> (model constructor, the fused op it runs, whether greedy generation from input_ids is compared)
def _families():
    t = transformers
    bert_kw = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    llama_kw = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=2, max_position_embeddings=64)
    return {
        "bert": (lambda: t.BertForSequenceClassification(t.BertConfig(**bert_kw)), "linear_act", False),
        "roberta": (lambda: t.RobertaForSequenceClassification(t.RobertaConfig(**bert_kw, pad_token_id=1)),
                    "linear_act", False),
        "deberta-v2": (lambda: t.DebertaV2ForSequenceClassification(t.DebertaV2Config(**bert_kw)), "linear_act",
                       False),
        "electra": (lambda: t.ElectraForSequenceClassification(t.ElectraConfig(**bert_kw, embedding_size=32)),
                    "linear_act", False),
        "distilbert": (lambda: t.DistilBertForSequenceClassification(t.DistilBertConfig(
            vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64)), "linear_act", False),
        "gpt2": (lambda: t.GPT2LMHeadModel(t.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2,
                                                        n_positions=64)), "linear_act", True),
        "gpt-neox": (lambda: t.GPTNeoXForCausalLM(t.GPTNeoXConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                                  num_attention_heads=2, intermediate_size=64)),
                     "linear_act", True),
        "falcon": (lambda: t.FalconForCausalLM(t.FalconConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                              num_attention_heads=2, bias=True)), "linear_act", True),
        "t5": (lambda: t.T5ForConditionalGeneration(t.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64,
                                                               num_layers=2, num_heads=2, decoder_start_token_id=0)),
               "linear_act", False),
        "t5-gated-gelu": (lambda: t.T5ForConditionalGeneration(t.T5Config(
            vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2, feed_forward_proj="gated-gelu",
            decoder_start_token_id=0)), "linear_glu", False),
        "clip-text": (lambda: t.CLIPTextModel(t.CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                                               num_hidden_layers=2, num_attention_heads=2,
                                                               hidden_act="gelu")), "linear_act", False),
        "clip-text-quick-gelu": (lambda: t.CLIPTextModel(t.CLIPTextConfig(  # CLIP's default activation
            vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)),
            "linear_act", False),
        "llama": (lambda: t.LlamaForCausalLM(t.LlamaConfig(**llama_kw)), "linear_glu", True),
        "mistral": (lambda: t.MistralForCausalLM(t.MistralConfig(**llama_kw)), "linear_glu", True),
        "qwen2": (lambda: t.Qwen2ForCausalLM(t.Qwen2Config(**llama_kw)), "linear_glu", True),
        "qwen3": (lambda: t.Qwen3ForCausalLM(t.Qwen3Config(**llama_kw, head_dim=16)), "linear_glu", True),
        "gemma": (lambda: t.GemmaForCausalLM(t.GemmaConfig(**llama_kw, head_dim=16)), "linear_glu", True),
        "phi3": (lambda: t.Phi3ForCausalLM(t.Phi3Config(**llama_kw, pad_token_id=0)), "linear_glu", True),
        "opt": (lambda: t.OPTForCausalLM(t.OPTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                                     num_attention_heads=2, word_embed_proj_dim=32)),
                "linear_act", True),
        "bart": (lambda: t.BartForConditionalGeneration(t.BartConfig(
            vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)),
            "linear_act", True),
        "whisper": (lambda: t.WhisperForConditionalGeneration(t.WhisperConfig(
            vocab_size=100, num_mel_bins=8, encoder_layers=1, decoder_layers=1, d_model=32, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=16,
            max_target_positions=32, decoder_start_token_id=1, pad_token_id=0)), "linear_act", False),
    }


FAMILIES = _families()
# the families whose fused method runs the whole block, fc2 included, as one fastnn.mlp op (the BERT
# family's fc2 is another module's; OPT, BART and Whisper fuse inside the layer's own forward)
BLOCK_FAMILIES = {"distilbert", "gpt2", "gpt-neox", "falcon", "t5", "t5-gated-gelu", "clip-text",
                  "clip-text-quick-gelu", "llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"}


def _inputs(name):
    ids = torch.randint(3, 100, (2, 9))
    if name.startswith("t5"):
        return dict(input_ids=ids, decoder_input_ids=torch.randint(3, 100, (2, 5)))
    if name == "whisper":
        return dict(input_features=torch.randn(2, 8, 32), decoder_input_ids=torch.randint(3, 100, (2, 5)))
    return dict(input_ids=ids)


def _fused_and_reference(name):
    """(fused model, its unfused twin, the fused blocks' records) for a family."""
    torch.manual_seed(0)
    model = FAMILIES[name][0]()
    reference = copy.deepcopy(model)
    fastnn.fuse(model)
    return model, reference, [r for r in model.fastnn_fuse_report if r.fused]


def _assert_same_seeded(reference, model, inputs):
    """Logits and every gradient of the fused model as the reference's, each run from the same
    random state (dropout alike)."""
    torch.manual_seed(5)
    y1, g1 = _outputs_and_grads(reference, **inputs)
    torch.manual_seed(5)
    y2, g2 = _outputs_and_grads(model, **inputs)
    torch.testing.assert_close(y2, y1, atol=1e-4, rtol=1e-4)
    _assert_grads_close(g1, g2, 4e-4, 4e-4)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_hugging_face_family(name, fused_calls):
    """Logits and every gradient as the unfused model's, in train mode (dropout seeded alike) and in
    eval; the fused op really runs; greedy generation gives the same tokens."""
    model, reference, fused = _fused_and_reference(name)
    op, causal = FAMILIES[name][1:]
    assert len(fused) in (2, 4), model.fastnn_fuse_report  # one block per layer (encoder + decoder for T5)
    inputs = _inputs(name)
    for mode in ("train", "eval"):
        model.train(mode == "train")
        reference.train(mode == "train")
        _assert_same_seeded(reference, model, inputs)
    assert fused_calls[op] == 2 * len(fused)
    assert fused_calls["mlp"] == (2 * len(fused) if name in BLOCK_FAMILIES else 0)
    if causal:
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            torch.testing.assert_close(model.generate(inputs["input_ids"], **kw),
                                       reference.generate(inputs["input_ids"], **kw), rtol=0, atol=0)


def _down_projection(module):
    """The projection after the activation of a block fuse runs as one op (its family's `down`)."""
    fam = next(f for f in fuse_module._FAMILIES if f.down and f.matches(module))
    return getattr(module, fam.down)


@pytest.mark.parametrize("name", sorted(BLOCK_FAMILIES))
def test_hooked_projection_after_the_activation(name, fused_calls):
    """Hooks on the projection after the activation (fc2, c_proj, down_proj, wo, lin2): the block
    cannot run as one op then; fc1 and its activation stay fused, the projection runs as itself, its
    hooks fire once per call and what they change counts, in train and eval mode; without the hooks
    the whole block is one op again."""
    model, reference, fused = _fused_and_reference(name)
    op = FAMILIES[name][1]
    seen = {"model": 0, "reference": 0}
    handles = []
    for which, m in (("model", model), ("reference", reference)):
        for r in fused:
            down = _down_projection(m.get_submodule(r.path))

            def count(mod, args, out, which=which):
                seen[which] += 1

            handles.append(down.register_forward_pre_hook(lambda mod, args: (args[0] * 0.5,)))
            handles.append(down.register_forward_hook(count))
    inputs = _inputs(name)
    for mode in ("train", "eval"):
        model.train(mode == "train")
        reference.train(mode == "train")
        _assert_same_seeded(reference, model, inputs)
    assert fused_calls["mlp"] == 0 and fused_calls[op] == 2 * len(fused)
    assert seen["model"] == seen["reference"] == 2 * len(fused)
    for h in handles:
        h.remove()
    fused_calls.clear()
    _assert_same_seeded(reference, model, inputs)
    assert fused_calls["mlp"] == len(fused)


@pytest.mark.parametrize("order", ["fuse-then-lora", "lora-then-fuse"])
def test_lora_on_the_projection_after_the_activation(order, fused_calls):
    """LoRA on down_proj alone: gate + up stay one fused op, down_proj runs as the adapter makes it
    (its gradients reach the adapter), and merging the adapter brings the whole block back as one op."""
    peft = pytest.importorskip("peft")

    def lora(model):
        torch.manual_seed(7)
        return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj"],
                                                          init_lora_weights=False))

    ids = torch.randint(0, 100, (2, 7))
    reference = lora(_llama())
    model = lora(fastnn.fuse(_llama())) if order == "fuse-then-lora" else fastnn.fuse(lora(_llama()))
    y1, g1 = _outputs_and_grads(reference, ids)
    y2, g2 = _outputs_and_grads(model, ids)
    torch.testing.assert_close(y2, y1, atol=1e-5, rtol=1e-5)
    _assert_grads_close(g1, g2, 1e-5, 1e-5)
    assert fused_calls["mlp"] == 0 and fused_calls["linear_glu"] == 2
    adapters = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert len(adapters) == 4 and all(g is not None and g.abs().sum() > 0 for g in adapters)
    fused_calls.clear()
    merged, merged_ref = model.merge_and_unload(), reference.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, merged_ref(ids).logits, atol=1e-5, rtol=1e-5)
    assert fused_calls["mlp"] == 2


def _logits(out):
    return out.logits if hasattr(out, "logits") else out[0]


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5", "phi3"])
def test_autocast_and_torch_func_through_fused_blocks(name, fused_calls):
    """A fused model under CPU autocast (bfloat16) computes in autocast's dtype as the unfused one
    does, and torch.func.grad over functional_call gives the unfused model's gradients."""
    model, reference, fused = _fused_and_reference(name)
    inputs = _inputs(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # (train mode: the dropouts seeded alike)
        torch.manual_seed(5)
        y1 = _logits(reference(**inputs))
        torch.manual_seed(5)
        y2 = _logits(model(**inputs))
    assert y2.dtype == y1.dtype == torch.bfloat16
    torch.testing.assert_close(y2, y1, atol=2e-2, rtol=2e-2)
    assert fused_calls["mlp"] == len(fused)

    def loss(params, m):
        return _logits(torch.func.functional_call(m, params, (), inputs)).float().square().sum()

    model.eval()
    reference.eval()
    g1 = torch.func.grad(loss)({k: v.detach() for k, v in reference.named_parameters()}, reference)
    g2 = torch.func.grad(loss)({k: v.detach() for k, v in model.named_parameters()}, model)
    assert g1.keys() == g2.keys()
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], atol=1e-4, rtol=1e-4)
    assert fused_calls["mlp"] == 2 * len(fused)


def test_torch_fx_symbolic_trace_of_fused_blocks():
    """torch.fx.symbolic_trace (timm's feature extraction runs it) of a model with fused MLP blocks
    as submodules: the fused method sees proxies, not tensors, and hands the block back to its own
    forward, which FX traces as it would unfused (the block op once did arithmetic on the proxied
    weights first: a TraceError on Phi-3's gate_up_proj and timm's GluMlp)."""
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
    from transformers.models.llama.modeling_llama import LlamaMLP
    from transformers.models.phi3.modeling_phi3 import Phi3MLP

    torch.manual_seed(0)
    heads = dict(num_attention_heads=2, num_key_value_heads=2)
    model = nn.Sequential(Phi3MLP(transformers.Phi3Config(hidden_size=16, intermediate_size=24, **heads)),
                          LlamaMLP(transformers.LlamaConfig(hidden_size=16, intermediate_size=24, **heads)),
                          GPT2MLP(24, transformers.GPT2Config(n_embd=16, n_head=2))).eval()
    reference = copy.deepcopy(model)
    assert sum(r.fused for r in fastnn.fuse(model).fastnn_fuse_report) == 3
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), reference(x))


def _saved_bytes(model, inputs):
    """Bytes of the tensors autograd keeps for backward in one training forward, parameters aside."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs)
    return sum(seen.values())


@pytest.mark.parametrize("name", ["gpt-neox", "llama", "t5"])
def test_fuse_recompute_levels(name, fused_calls):
    """fuse(model, recompute=level): the same logits and gradients as the unfused model in training
    (T5's dropout between its projections included, seeded alike), less kept for backward at each
    level (with dropout running, fastnn.mlp's "activation" keeps what "none" does), the block op
    running; fusing again sets the level; an unknown level is an error."""
    _, reference, _ = _fused_and_reference(name)
    inputs = _inputs(name)
    kept = {}
    for level in ("none", "activation", "fc1"):
        model = fastnn.fuse(copy.deepcopy(reference), recompute=level)
        blocks = [r for r in model.fastnn_fuse_report if r.fused]
        assert all((f"recompute={level!r}" in r.detail) == (level != "none") for r in blocks), blocks
        model.train()
        reference.train()
        _assert_same_seeded(reference, model, inputs)
        kept[level] = _saved_bytes(model, inputs)
    if name == "t5":  # dropout runs between its projections: "activation" keeps what "none" keeps there
        assert kept["fc1"] < kept["activation"] == kept["none"], kept
    else:
        assert kept["fc1"] < kept["activation"] < kept["none"], kept
    assert fused_calls["mlp"] > 0
    model = fastnn.fuse(copy.deepcopy(reference), recompute="fc1")
    fastnn.fuse(model)  # again, at the default level
    assert _saved_bytes(model.train(), inputs) == kept["none"]
    with pytest.raises(ValueError, match="unknown recompute level 'all'"):
        fastnn.fuse(model, recompute="all")


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("name", [n for n in FAMILIES if FAMILIES[n][0]().supports_gradient_checkpointing])
def test_hugging_face_gradient_checkpointing(name, reentrant, fused_calls):
    """transformers' gradient checkpointing (model.gradient_checkpointing_enable) on a fused model:
    its recomputation in backward runs the fused op again, as the forward did (non-reentrant
    checkpointing checks that both save as many tensors), and gives the unfused model's gradients."""
    model, reference, fused = _fused_and_reference(name)
    op = FAMILIES[name][1]
    for m in (model, reference):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        m.train()
    _assert_same_seeded(reference, model, _inputs(name))
    assert fused_calls[op] == 2 * len(fused)  # the forward and its recomputation, per fused block
    assert fused_calls["mlp"] == (2 * len(fused) if name in BLOCK_FAMILIES else 0)


def _replica_copy(t, scale):
    return t * scale if t.is_floating_point() else t.clone()  # (integer buffers: position ids)


@pytest.fixture
def replicate_on_cpu(monkeypatch):
    """torch.nn.parallel.replicate, what nn.DataParallel runs to make its replicas, on CPU: its
    broadcast to the devices is replaced by copies, scaled per replica (replica j's parameters are
    1 + j / 4 times the module's), so that a replica computing with the module's own parameters
    shows (on GPUs it would meet parameters on another device)."""
    replicate = importlib.import_module("torch.nn.parallel.replicate")

    def broadcast(tensors, devices, detach=False):
        return [[_replica_copy(t.detach() if detach else t, 1 + j / 4) for t in tensors] for j in range(len(devices))]

    monkeypatch.setattr(replicate, "_broadcast_coalesced_reshape", broadcast)
    return replicate.replicate


def _torch_module(name):
    torch.manual_seed(0)
    if name == "sequential":
        return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32), nn.ReLU())
    return nn.TransformerEncoderLayer(32, 2, dim_feedforward=64, dropout=0.0, batch_first=True, activation="gelu")


@pytest.mark.parametrize("name", ["sequential", "encoder-layer", *FAMILIES])
def test_data_parallel_replicas(name, replicate_on_cpu, fused_calls):
    """nn.DataParallel's replicas of a fused model (torch.nn.parallel.replicate) run fused with
    their own parameters, and the gradients reach the model's."""
    if name in FAMILIES:
        model, reference, fused = _fused_and_reference(name)
        op, inputs = FAMILIES[name][1], _inputs(name)
    else:
        model = _torch_module(name)
        reference = copy.deepcopy(model)
        fused = [r for r in fastnn.fuse(model).fastnn_fuse_report if r.fused]
        op, inputs = "linear_act", {}
    model.eval()
    reference.eval()
    results = []
    for m in (reference, model):
        m.zero_grad(set_to_none=True)
        ys = []
        for replica in replicate_on_cpu(m, [0, 1]):
            y = replica(**inputs) if inputs else replica(torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(1)))
            ys.append(y if isinstance(y, torch.Tensor) else y[0])
        sum(y.float().square().sum() for y in ys).backward()
        results.append(([y.detach() for y in ys], [p.grad for p in m.parameters()]))
    (y1, g1), (y2, g2) = results
    # (tolerances relative to the largest output and gradient: the tiny models' logits are small,
    # and a replica computing with the module's parameters would be off by about a quarter)
    y_scale = max(y.abs().max().item() for y in y1)
    g_scale = max(g.abs().max().item() for g in g1 if g is not None)
    for a, b in zip(y1, y2):
        torch.testing.assert_close(b, a, atol=1e-5 * y_scale, rtol=1e-5)
    _assert_grads_close(g1, g2, 1e-5 * g_scale, 1e-4)
    assert fused_calls[op] == 2 * len(fused)  # each replica's


def test_unknown_hf_activation_left_with_reason():
    cfg = transformers.CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, hidden_act="mish")
    model = fastnn.fuse(transformers.CLIPTextModel(cfg))
    left = [r for r in model.fastnn_fuse_report if not r.fused]
    assert len(left) == 1 and "has no fastnn equivalent" in left[0].detail, left
    opt = transformers.OPTForCausalLM(transformers.OPTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                                             ffn_dim=64, num_attention_heads=2, word_embed_proj_dim=32,
                                                             activation_function="mish"))
    report = fastnn.fuse(opt).fastnn_fuse_report
    assert [r.fused for r in report] == [False] and "has no fastnn equivalent" in report[0].detail, report


class _ScaledLinear(nn.Linear):
    """A projection that is no plain nn.Linear (its own forward), as a 1x1 Conv2d fc1 is (timm's
    conv-MLP ConvNeXts): fastnn does not read its weights."""

    def forward(self, x):
        return super().forward(x) * 0.5


def test_projection_fastnn_cannot_read_is_left_with_reason(fused_calls):
    """A family module whose projection fastnn cannot read is reported as left (it was reported
    fused, with a method installed that could only ever run the module's own), and runs as it was."""
    cfg = transformers.CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, hidden_act="gelu")
    torch.manual_seed(0)
    model = transformers.CLIPTextModel(cfg).eval()
    mlp = model.encoder.layers[0].mlp
    odd = _ScaledLinear(32, 64)
    odd.load_state_dict(mlp.fc1.state_dict())
    mlp.fc1 = odd
    reference = copy.deepcopy(model)
    report = fastnn.fuse(model).fastnn_fuse_report
    left = [r for r in report if r.path.endswith("layers.0.mlp")]
    assert len(left) == 1 and not left[0].fused and "fc1 is a _ScaledLinear, not a Linear" in left[0].detail, report
    assert not any(r.fused for r in report), report
    assert not fastnn.dropin.installed(mlp, "forward")
    ids = torch.randint(0, 100, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).last_hidden_state, reference(ids).last_hidden_state)
    assert sum(fused_calls.values()) == 0


def _opt():
    cfg = transformers.OPTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                 num_attention_heads=2, word_embed_proj_dim=32)
    torch.manual_seed(0)
    return transformers.OPTForCausalLM(cfg).eval()


def test_layer_level_fc1_is_still_fc1(fused_calls):
    """In a fused OPT layer fc1 returns act(fc1(x)) only to its own layer's forward: called directly,
    hooked, wrapped by LoRA, or with activation_fn hooked, everything is what it was unfused."""
    model, reference = _opt(), _opt()
    fastnn.fuse(model)
    layer, ref_layer = model.model.decoder.layers[0], reference.model.decoder.layers[0]
    x = torch.randn(5, 32)
    torch.testing.assert_close(layer.fc1(x), ref_layer.fc1(x))  # the pre-activation, outside the layer
    torch.testing.assert_close(layer.activation_fn(-x), ref_layer.activation_fn(-x))
    assert fused_calls["linear_act"] == 0
    ids = torch.randint(3, 100, (2, 7))
    for target in ("fc1", "activation_fn"):
        seen = []
        handle = getattr(layer, target).register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)
        handle.remove()
        assert len(seen) == 1 and fused_calls["linear_act"] == 1  # the other layer's only
        fused_calls.clear()
        if target == "fc1":
            assert (seen[0] < 0).any()  # the pre-activation (relu's input), not its output
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)
    assert fused_calls["linear_act"] == 2  # fused again, one call per layer
    fastnn.unfuse(model)
    assert not any(isinstance(v, (FusedCall, ReplicateForDataParallel)) for m in model.modules() for v in m.__dict__.values())


@pytest.mark.parametrize("order", ["fuse-then-lora", "lora-then-fuse"])
def test_layer_level_lora_on_fc1(order, fused_calls):
    peft = pytest.importorskip("peft")
    model, reference = _opt(), _opt()
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1"], init_lora_weights=False)
    if order == "fuse-then-lora":
        fastnn.fuse(model)
    torch.manual_seed(1)
    model = peft.get_peft_model(model, lora)
    torch.manual_seed(1)
    reference = peft.get_peft_model(reference, lora)
    if order == "lora-then-fuse":
        fastnn.fuse(model)
    ids = torch.randint(3, 100, (2, 7))
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)
    assert fused_calls["linear_act"] == 0


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_hooks_on_inner_projection_fire(fused_calls):
    model = _llama()
    reference = copy.deepcopy(model)
    fastnn.fuse(model)
    captured = []
    model.model.layers[0].mlp.gate_proj.register_forward_hook(lambda m, i, o: captured.append(o))
    ids = torch.randint(0, 100, (1, 5))
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)
    assert len(captured) == 1 and fused_calls["linear_glu"] == 1  # layer 0 unfused, layer 1 fused


peft = pytest.importorskip("peft")


def _lora(model):
    torch.manual_seed(7)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj"], init_lora_weights=False)
    return peft.get_peft_model(model, cfg)


@pytest.mark.parametrize("order", ["fuse-then-lora", "lora-then-fuse"])
def test_lora_is_never_bypassed(order, fused_calls):
    """The usual order (load, fuse, fine-tune with LoRA) and the other: the adapters count, the
    gradients reach them, and merging the adapters brings the fused path back."""
    ids = torch.randint(0, 100, (2, 7))
    reference = _lora(_llama())
    if order == "fuse-then-lora":
        model = _lora(fastnn.fuse(_llama()))
    else:
        model = fastnn.fuse(_lora(_llama()))
        assert all("runs unfused while gate_proj is a" in r.detail for r in model.fastnn_fuse_report if r.fused)
    y1, g1 = _outputs_and_grads(reference, ids)
    y2, g2 = _outputs_and_grads(model, ids)
    torch.testing.assert_close(y2, y1, atol=1e-5, rtol=1e-5)
    _assert_grads_close(g1, g2, 1e-5, 1e-5)
    assert fused_calls["linear_glu"] == 0
    merged, merged_ref = model.merge_and_unload(), reference.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, merged_ref(ids).logits, atol=1e-5, rtol=1e-5)
    assert fused_calls["linear_glu"] == 2


accelerate = pytest.importorskip("accelerate")


def test_accelerate_cpu_offload(fused_calls):
    """Weights offloaded to meta, brought in by accelerate's hooks on each Linear: the fused block
    sees hooked projections and runs them, right."""
    model = _llama()
    reference = copy.deepcopy(model)
    fastnn.fuse(model)
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    assert model.model.layers[0].mlp.gate_proj.weight.is_meta
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)


def test_save_pretrained_round_trip(tmp_path):
    model = fastnn.fuse(_llama())
    model.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert "forward" not in loaded.model.layers[0].mlp.__dict__  # a plain model: fuse it when wanted
    ids = torch.randint(0, 100, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(fastnn.fuse(loaded)(ids).logits, model(ids).logits, atol=1e-6, rtol=1e-6)
