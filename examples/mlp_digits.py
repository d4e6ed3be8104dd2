"""The classic MLP (784-128-64-10, ReLU, SGD, cross-entropy) built from fastnn modules, trained
on real data that ships with scikit-learn (the 8x8 digits, resized to 28x28 = 784 inputs), next
to the identical plain-PyTorch model trained from the same seed.

    python examples/mlp_digits.py [--epochs 10]
"""
import argparse

import torch
import torch.nn.functional as F
from torch import nn

import fastnn


def load_digits_784(seed=0):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).flatten(1)  # 784 features
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_test = 360
    return (x[n_test:], y[n_test:]), (x[:n_test], y[:n_test])


def plain_mlp():
    return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def fastnn_mlp():
    # the same parameters, created in the same order, so one seed gives both the same weights
    return nn.Sequential(fastnn.FusedLinear(784, 128, activation="relu"),
                         fastnn.FusedLinear(128, 64, activation="relu"),
                         nn.Linear(64, 10))


def train(model, data, epochs, seed, lr=0.02, batch=32):
    (x, y), (xt, yt) = data
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(y), generator=g)
        total = 0.0
        for i in range(0, len(y), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
    model.eval()
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    return acc, total / len(y)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    data = load_digits_784()
    results = {}
    for name, build in (("fastnn", fastnn_mlp), ("plain PyTorch", plain_mlp)):
        torch.manual_seed(args.seed)
        model = build()
        results[name] = train(model, data, args.epochs, args.seed)
        print(f"{name:14s} test accuracy {results[name][0]:.4f} (last epoch train loss {results[name][1]:.4f})")
    return results


if __name__ == "__main__":
    main()
