"""Exercises every path of the CUDA backend once on small, awkward shapes: run under
`compute-sanitizer --tool memcheck` by gpu_check.sh (an out-of-bounds access fails the run)."""
import torch

import fastnn


def main():
    torch.manual_seed(0)
    shapes = [(1, 1, 1), (5, 17, 33), (64, 64, 128), (33, 40, 250)]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for m, k, n in shapes:
            x = torch.randn(m, k, device="cuda", dtype=dtype, requires_grad=True)
            w = (torch.randn(n, k, device="cuda") / k**0.5).to(dtype).requires_grad_()
            b = torch.randn(n, device="cuda", dtype=dtype, requires_grad=True)
            for act in fastnn.ACTIVATIONS:
                for bias in (b, None):
                    y = fastnn.linear_act(x, w, bias, act, backend="cuda")
                    y.float().square().sum().backward()
                    with torch.no_grad():
                        fastnn.linear_act(x, w, bias, act, backend="cuda")
            wu = (torch.randn(n, k, device="cuda") / k**0.5).to(dtype).requires_grad_()
            for act in fastnn.GATED:
                fastnn.linear_glu(x, w, wu, b, None, act, backend="cuda").float().sum().backward()
            # the MLP block: relu and gelu_tanh take cuBLASLt's dgrad epilogues over the kept aux
            w2 = (torch.randn(k, n, device="cuda") / n**0.5).to(dtype).requires_grad_()
            for act in ("relu", "gelu_tanh", "gelu"):
                fastnn.mlp(x, w, b, w2, None, act, backend="cuda").float().sum().backward()
    torch.cuda.synchronize()
    print("sanitize_cuda: all paths ran")


if __name__ == "__main__":
    main()
