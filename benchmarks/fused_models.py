"""What fastnn.fuse gives a model's MLP blocks: transformers' own MLP modules, unfused and fused,
side by side in one run (training: forward + backward; inference: forward under no_grad).

    python benchmarks/fused_models.py                     # CLIP, GPT-2, GPT-NeoX, LLaMA MLPs, 2048 tokens
    python benchmarks/fused_models.py --modules llama --rows 256 --dtype bfloat16 --mode train

Configurations per module: the module itself ("unfused"); fused with the whole block as one
fastnn.mlp op, fc2 included, as fastnn.fuse runs it where every part is plain ("fuse"); and fused
with that block path turned off, fc1 + activation as one op and fc2 the module's own ("fuse, fc1 +
activation only": how a block runs while its fc2 is wrapped or hooked, and what fuse ran before the
block path). Each is first checked against the module in float64 with the numerics rule of
../shared/design.md (output, input gradient and every parameter gradient within 2x the unfused
module's error plus 2 eps of the largest magnitude); times are medians of interleaved rounds, the
speed-up the median of each round's ratio (fused_linear.py's method). Needs transformers.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fused_linear as bench  # noqa: E402  (timing, ratios, environment)

import fastnn  # noqa: E402

fuse_module = importlib.import_module("fastnn.fuse")  # (fastnn.fuse is the function)


def _modules(hidden, intermediate):
    """name -> a function making the module (transformers' classes, random weights)."""
    import transformers
    from transformers.models.clip.modeling_clip import CLIPMLP
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXMLP
    from transformers.models.llama.modeling_llama import LlamaMLP

    return {
        "clip": ("CLIPMLP gelu", lambda: CLIPMLP(transformers.CLIPTextConfig(
            hidden_size=hidden, intermediate_size=intermediate, hidden_act="gelu"))),
        "gpt2": ("GPT2MLP gelu_tanh (Conv1D)", lambda: GPT2MLP(intermediate, transformers.GPT2Config(
            n_embd=hidden, activation_function="gelu_new", resid_pdrop=0.0))),
        "gpt-neox": ("GPTNeoXMLP gelu", lambda: GPTNeoXMLP(transformers.GPTNeoXConfig(
            hidden_size=hidden, intermediate_size=intermediate, hidden_act="gelu"))),
        "llama": ("LlamaMLP swiglu", lambda: LlamaMLP(transformers.LlamaConfig(
            hidden_size=hidden, intermediate_size=intermediate * 2 // 3, hidden_act="silu"))),
    }


def _step(module, x, dy, train, block):
    """One call of the module (forward, and backward when training); returns the output and the
    gradients. block=False turns fuse's block path off for the call."""
    real = fuse_module._fused_block
    if not block:
        fuse_module._fused_block = lambda *args: NotImplemented
    try:
        if not train:
            with torch.no_grad():
                return (module(x),)
        x = x.detach().requires_grad_()
        y = module(x)
        params = [p for p in module.parameters()]
        grads = torch.autograd.grad(y, [x, *params], dy)
        return (y.detach(), *grads)
    finally:
        fuse_module._fused_block = real


def run_module(label, make, args, dtype_name, train):
    dtype = bench.DTYPES[dtype_name]
    torch.manual_seed(0)
    base = make().to(dtype).eval()
    fused = fastnn.fuse(copy.deepcopy(base))
    hidden = args.hidden
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.rows, hidden, generator=gen).to(dtype)
    dy = torch.randn(args.rows, hidden, generator=gen).to(dtype)
    ref = _step(copy.deepcopy(base).double(), x.double(), dy.double(), train, True)
    eager_errs = bench.max_errors(_step(base, x, dy, train, True), ref)
    configs = [("unfused", lambda: _step(base, x, dy, train, True)),
               ("fuse, fc1 + activation only", lambda: _step(fused, x, dy, train, False)),
               ("fuse", lambda: _step(fused, x, dy, train, True))]
    status = {name: bench.check(fn(), ref, eager_errs, dtype_name) for name, fn in configs}
    timed = [(name, fn) for name, fn in configs if status[name] is None]
    samples = bench.interleaved_samples([fn for _, fn in timed], torch.device("cpu"), args.repeats, args.min_sample_s)
    by_name = dict(zip((name for name, _ in timed), samples))
    mode = "train" if train else "infer"
    print(f"\n{label}, {args.rows} tokens x {hidden}, {dtype_name}, {mode}")
    print(f"  {'config':30s} {'ms':>9s} {'vs unfused':>10s} {'IQR':>11s}  status")
    for name, _ in configs:
        if status[name] is not None:
            print(f"  {name:30s} {'-':>9s} {'-':>10s} {'-':>11s}  WRONG: {status[name]}")
            continue
        ms = sorted(by_name[name])[len(by_name[name]) // 2] * 1e3
        ratio, q1, q3 = bench.paired_ratio(by_name["unfused"], by_name[name]) if "unfused" in by_name else (0, 0, 0)
        print(f"  {name:30s} {ms:9.3f} {ratio:9.2f}x {q1:5.2f}-{q3:4.2f}  ok")
    return all(s is None for s in status.values())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modules", nargs="+", default=["clip", "gpt2", "gpt-neox", "llama"])
    p.add_argument("--rows", type=int, default=2048, help="tokens per call")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--intermediate", type=int, default=3072, help="(LLaMA's gated MLP gets two thirds of it)")
    p.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=list(bench.DTYPES))
    p.add_argument("--mode", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    p.add_argument("--repeats", type=int, default=11, help="interleaved rounds")
    p.add_argument("--min-sample-s", type=float, default=0.05)
    args = p.parse_args(argv)
    try:
        modules = _modules(args.hidden, args.intermediate)
    except ImportError as exc:
        print(f"fused_models.py needs transformers ({exc})", file=sys.stderr)
        return 2
    unknown = [m for m in args.modules if m not in modules]
    if unknown:
        p.error(f"unknown module(s) {unknown}; known: {', '.join(modules)}")
    env = bench.environment(torch.device("cpu"))
    print(f"fastnn {env['fastnn']} ({env['git_commit']}) on {env['device']}; torch {env['torch']}; {env['date']}")
    ok = True
    for key in args.modules:
        label, make = modules[key]
        for dtype_name in args.dtype:
            for mode in args.mode:
                ok &= run_module(label, make, args, dtype_name, mode == "train")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
