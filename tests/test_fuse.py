"""fastnn.fuse: the patterns it swaps, what it leaves alone, and that nothing else changes."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastnn
from fastnn.modules import FusedLinear


def _outputs_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    y = model(x)
    y = y if isinstance(y, torch.Tensor) else y[0]
    y.float().square().sum().backward()
    return y.detach(), [p.grad.clone() if p.grad is not None else None for p in model.parameters()]


def _assert_same(model, fused, x, atol=2e-5):
    y1, g1 = _outputs_and_grads(model, x)
    y2, g2 = _outputs_and_grads(fused, x)
    torch.testing.assert_close(y2, y1, atol=atol, rtol=atol)
    for a, b in zip(g1, g2):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(b, a, atol=atol * 4, rtol=atol * 4)


ACT_MODULES = [nn.ReLU(), nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.Sigmoid(), nn.Tanh(), nn.LeakyReLU()]


@pytest.mark.parametrize("act", ACT_MODULES, ids=lambda m: repr(m))
def test_sequential_patterns(act):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), act, nn.Linear(20, 6))
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    fastnn.fuse(model)
    assert isinstance(model[0], FusedLinear) and isinstance(model[1], nn.Identity)
    assert type(model[2]) is nn.Linear  # not followed by an activation
    assert list(model.state_dict()) == keys
    assert [id(p) for p in model.parameters()] == params  # shared, not copied
    _assert_same(reference, model, torch.randn(5, 12))
    assert any(r.fused and r.path == "0" for r in model.fastnn_fuse_report)


def test_left_alone():
    model = nn.Sequential(nn.Linear(4, 4), nn.LeakyReLU(0.2), nn.Linear(4, 4), nn.Softplus(), nn.Linear(4, 4),
                          nn.Dropout(0.1), nn.ReLU())
    fastnn.fuse(model)
    assert all(type(m) is nn.Linear for m in (model[0], model[2], model[4]))
    left = {r.path: r.detail for r in model.fastnn_fuse_report if not r.fused}
    assert "slope 0.2" in left["0"] and "Softplus" in left["2"]


def test_optimizer_and_tied_weights_keep_working():
    torch.manual_seed(0)
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Tanh())  # the same Linear twice (tied)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built before fuse
    fastnn.fuse(model)
    assert model[0].weight is model[2].weight is shared.weight
    before = shared.weight.detach().clone()
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    assert not torch.equal(shared.weight, before)  # the optimiser still updates the shared parameter


def test_transformer_encoder_layer_swapped():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True, activation="gelu")
    model = nn.ModuleDict({"enc": layer})
    reference = copy.deepcopy(layer)
    fastnn.fuse(model)
    assert isinstance(model["enc"], fastnn.TransformerEncoderLayer)
    assert model["enc"].linear1.weight is layer.linear1.weight
    _assert_same(reference, model["enc"], torch.randn(2, 5, 16))


def test_fuse_rejects_a_bare_pattern():
    with pytest.raises(ValueError, match="in place"):
        fastnn.fuse(nn.TransformerEncoderLayer(8, 2))


# ---- Hugging Face transformers (random weights from small configs: nothing is downloaded) -------
transformers = pytest.importorskip("transformers")


def _eval(model):
    model.eval()
    return model


def test_bert_intermediate():
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = _eval(transformers.BertForSequenceClassification(cfg))
    reference = copy.deepcopy(model)
    fastnn.fuse(model)
    swapped = [r for r in model.fastnn_fuse_report if r.fused]
    assert len(swapped) == 2 and all("Intermediate" in r.kind for r in swapped)
    ids = torch.randint(0, 100, (2, 7))
    torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    assert list(model.state_dict()) == list(reference.state_dict())


def test_gpt2_mlp_conv1d_layout():
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=16, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = _eval(transformers.GPT2LMHeadModel(cfg))
    reference = copy.deepcopy(model)
    fastnn.fuse(model)
    assert sum(r.fused for r in model.fastnn_fuse_report) == 2
    ids = torch.randint(0, 100, (2, 9))
    _assert_same(reference, model, ids, atol=1e-4)


def test_llama_gated_mlp():
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = _eval(transformers.LlamaForCausalLM(cfg))
    reference = copy.deepcopy(model)
    fastnn.fuse(model)
    fused = [r for r in model.fastnn_fuse_report if r.fused]
    assert len(fused) == 2 and "swiglu" in fused[0].detail
    ids = torch.randint(0, 100, (2, 9))
    _assert_same(reference, model, ids, atol=1e-4)
