"""transformers' own model tests on fused models: its ModelTesterMixin (save and load, batching and
padding equivalence, determinism, attention masks, hidden states and attentions, feed-forward
chunking, resized embeddings, training, gradient checkpointing in both modes, ...) and, for the
causal LMs, its training mixin (a tiny model overfits a fixed batch in 300 steps and then generates
it) run on tiny
BERT, LLaMA, GPT-2, OPT, DistilBERT, GPT-NeoX and Phi-3 models that fastnn.fuse fused as they were
built. These cover the ways fuse installs itself: a BERT-family intermediate, a LLaMA gated MLP,
GPT-2's Conv1D MLP, an OPT layer's own forward, DistilBERT's ff_chunk, GPT-NeoX's dense_h_to_4h and
Phi-3's gate_up_proj halves.

The mixin is transformers' tests/test_modeling_common.py, taken from the source distribution of the
installed version (pip download, cached in the temp folder: the wheel has no tests). The
per-model testers of transformers' repository are not in that distribution either; the small
Tester below gives the mixin what it asks of one. The generation and export mixins it imports are
not there: they are stubbed (fastnn's own tests/test_fuse.py compares greedy generation).
"""
import collections
import importlib
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import unittest
from unittest import mock

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("parameterized")  # (the mixin's own dependency)

import fastnn  # noqa: E402
from fused_calls import counting_replacements  # noqa: E402
from transformers import PreTrainedModel  # noqa: E402

_PACKAGE = "fastnn_transformers_tests"
_STUBS = {"generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
          "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n"}


def _download_mixins(download, package):
    """transformers' top-level test modules from its source distribution (pip download into
    `download`) into `package`, with the stubs; skips this test module where pip cannot get it."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "--retries", "1",
           "--timeout", "60", "-d", download, f"transformers=={transformers.__version__}"]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        failure = result.stderr[-500:] if result.returncode else None
    except subprocess.TimeoutExpired:
        failure = "pip download timed out"
    sdists = [f for f in os.listdir(download) if f.endswith(".tar.gz")]
    if failure or not sdists:
        pytest.skip(f"transformers' source distribution could not be downloaded: {failure}", allow_module_level=True)
    for sub in ("generation", "exporters"):
        os.makedirs(os.path.join(package, sub), exist_ok=True)
        open(os.path.join(package, sub, "__init__.py"), "w").close()
    open(os.path.join(package, "__init__.py"), "w").close()
    for path, text in _STUBS.items():
        with open(os.path.join(package, path), "w") as f:
            f.write(text)
    # the mixin itself last: its presence says the folder is complete
    with tarfile.open(os.path.join(download, sdists[0])) as tar:
        members = sorted((m for m in tar.getmembers() if re.fullmatch(r"[^/]+/tests/[^/]+\.py", m.name)),
                         key=lambda m: m.name.endswith("/test_modeling_common.py"))
        for member in members:
            target = os.path.join(package, os.path.basename(member.name))
            with tar.extractfile(member) as src, open(target + ".part", "wb") as dst:
                dst.write(src.read())
            os.replace(target + ".part", target)


def _mixin_module():
    """transformers' test_modeling_common for the installed version, as a module of a package in
    the temp folder (it imports its siblings relatively)."""
    root = os.path.join(tempfile.gettempdir(), f"fastnn-transformers-{transformers.__version__}-tests")
    package = os.path.join(root, _PACKAGE)
    common = os.path.join(package, "test_modeling_common.py")
    if not os.path.exists(common):
        with tempfile.TemporaryDirectory() as download:
            _download_mixins(download, package)
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module(f"{_PACKAGE}.test_modeling_common")


common = _mixin_module()
generation = importlib.import_module(f"{_PACKAGE}.generation.test_utils")
training = importlib.import_module(f"{_PACKAGE}.test_training_mixin")


class Tester:
    """What the mixin asks of a model tester: sizes, a config and inputs."""
    batch_size, seq_length, vocab_size, hidden_size = 13, 7, 99, 32
    num_hidden_layers, num_attention_heads, intermediate_size = 2, 4, 37  # (37: an awkward width)
    is_training, num_choices = True, 4

    def __init__(self, parent, config, token_types, causal_lm_class):
        self.parent, self.config, self.token_types = parent, config, token_types
        self.causal_lm_class = causal_lm_class  # (the training mixin's model)

    def get_config(self):
        return self.config(self)

    def prepare_config_and_inputs_for_common(self):
        inputs = {"input_ids": common.ids_tensor([self.batch_size, self.seq_length], self.vocab_size),
                  "attention_mask": common.random_attention_mask([self.batch_size, self.seq_length])}
        if self.token_types:
            inputs["token_type_ids"] = common.ids_tensor([self.batch_size, self.seq_length], 2)
        return self.get_config(), inputs


def _bert(t):
    return transformers.BertConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                                   num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                                   intermediate_size=t.intermediate_size, hidden_act="gelu", type_vocab_size=2,
                                   max_position_embeddings=64)


def _llama(t):
    return transformers.LlamaConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                                    num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                                    num_key_value_heads=2, intermediate_size=t.intermediate_size, hidden_act="silu",
                                    max_position_embeddings=64, pad_token_id=0)


def _gpt2(t):
    return transformers.GPT2Config(vocab_size=t.vocab_size, n_embd=t.hidden_size, n_layer=t.num_hidden_layers,
                                   n_head=t.num_attention_heads, n_inner=t.intermediate_size, n_positions=64,
                                   activation_function="gelu_new", pad_token_id=0)


def _opt(t):
    return transformers.OPTConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                                  num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                                  ffn_dim=t.intermediate_size, word_embed_proj_dim=t.hidden_size,
                                  max_position_embeddings=64, activation_function="relu", pad_token_id=1)


def _distilbert(t):
    return transformers.DistilBertConfig(vocab_size=t.vocab_size, dim=t.hidden_size, n_layers=t.num_hidden_layers,
                                         n_heads=t.num_attention_heads, hidden_dim=t.intermediate_size,
                                         activation="gelu", max_position_embeddings=64, pad_token_id=0)


def _gpt_neox(t):
    return transformers.GPTNeoXConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                                      num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                                      intermediate_size=t.intermediate_size, hidden_act="gelu",
                                      max_position_embeddings=64, pad_token_id=0,
                                      rotary_pct=0.5)  # (of head_dim 8: the default 0.25's 2 divides by 0 in rope scaling)


def _phi3(t):
    return transformers.Phi3Config(vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                                   num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                                   num_key_value_heads=2, intermediate_size=t.intermediate_size, hidden_act="silu",
                                   max_position_embeddings=64, pad_token_id=0, original_max_position_embeddings=64)


_fused_ops_run = {}  # test class -> Counter of the fused ops its models ran


def _fused_post_init(post_init):
    def fused(self, *args, **kwargs):
        out = post_init(self, *args, **kwargs)
        fastnn.fuse(self)
        return out
    return fused


class FusedModelTest(common.ModelTesterMixin):
    """Every model the mixin builds (constructors, from_pretrained, _from_config) is fused."""
    config = token_types = None

    def setUp(self):
        causal = next((c for c in self.all_model_classes if c.__name__.endswith(("ForCausalLM", "LMHeadModel"))), None)
        self.model_tester = Tester(self, type(self).config, self.token_types, causal)
        calls = _fused_ops_run.setdefault(type(self).__name__, collections.Counter())
        patches = [mock.patch.object(PreTrainedModel, "post_init", _fused_post_init(PreTrainedModel.post_init))]
        patches += [mock.patch.object(module, name, replacement)
                    for module, name, replacement in counting_replacements(calls)]
        for patch in patches:
            patch.start()
            self.addCleanup(patch.stop)


# (the mixin requires a model that can generate to have the generation tests: here their stub)
Generative = generation.GenerationTesterMixin
# transformers' overfit test: 300 Adam steps on a fixed batch, then greedy generation must give
# the training sequence back
Training = training.TrainingTesterMixin
T = transformers


class TestBert(FusedModelTest, unittest.TestCase):
    all_model_classes = (T.BertModel, T.BertForMaskedLM, T.BertForSequenceClassification, T.BertForMultipleChoice)
    config, token_types = _bert, True


class TestLlama(FusedModelTest, Generative, Training, unittest.TestCase):
    all_model_classes = (T.LlamaModel, T.LlamaForCausalLM, T.LlamaForSequenceClassification)
    config = _llama


class TestGpt2(FusedModelTest, Generative, Training, unittest.TestCase):
    all_model_classes = (T.GPT2LMHeadModel, T.GPT2ForTokenClassification)
    config = _gpt2


class TestOpt(FusedModelTest, Generative, Training, unittest.TestCase):
    all_model_classes = (T.OPTForCausalLM, T.OPTForSequenceClassification)
    config = _opt


class TestDistilBert(FusedModelTest, unittest.TestCase):
    all_model_classes = (T.DistilBertModel, T.DistilBertForMaskedLM, T.DistilBertForSequenceClassification)
    config = _distilbert


class TestGptNeox(FusedModelTest, Generative, unittest.TestCase):
    all_model_classes = (T.GPTNeoXModel, T.GPTNeoXForCausalLM)
    config = _gpt_neox


class TestPhi3(FusedModelTest, Generative, unittest.TestCase):
    all_model_classes = (T.Phi3Model, T.Phi3ForCausalLM)
    config = _phi3


def test_models_ran_fused():
    """(After the classes above: pytest keeps a module's order.) Each family's models ran fastnn's
    fused ops, not only their unfused fallback."""
    if not _fused_ops_run:
        pytest.skip("none of the classes above ran")
    assert all(sum(calls.values()) > 0 for calls in _fused_ops_run.values()), _fused_ops_run
