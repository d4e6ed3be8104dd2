"""torch.library.opcheck on every op, and torch.compile(fullgraph=True) with no graph break."""
import pytest
import torch

import fastnn
from cases import STANDIN
from numerics import check_against_reference, make_inputs, torch_linear_act, torch_linear_glu


# the ops on the cpu backend, and on the cuda backend's Python with the CPU stand-in for fastnn._cuda
# (conftest.py): its fake kernels' saved layouts (the mask's and gelu_tanh's padded rows) against its own
BACKENDS = [pytest.param("cpu", "cpu", id="cpu"), pytest.param("cuda", "cpu", marks=STANDIN, id="cuda-standin")]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("activation", ["identity", "relu", "gelu", "leaky_relu", "gelu_tanh"])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_linear_act(activation, bias, backend, device):
    x, w, b = make_inputs((7, 10), 9, torch.float32, device, bias=bias)
    for save in (True, False):
        torch.library.opcheck(torch.ops.fastnn.linear_act_fwd.default, (x, w, b, activation, backend, save))
    y, saved = torch.ops.fastnn.linear_act_fwd(x.detach(), w.detach(), None if b is None else b.detach(),
                                               activation, backend, True)
    dy = torch.randn_like(y)
    for needs in [(True, True, True), (True, False, False), (False, True, bias)]:
        torch.library.opcheck(torch.ops.fastnn.linear_act_bwd.default,
                              (dy, x.detach(), w.detach(), None if b is None else b.detach(), saved, activation,
                               backend, *needs))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("activation", ["swiglu", "reglu"])
def test_opcheck_linear_glu(activation, backend, device):
    x, wg, wu, bg, bu = make_inputs((6, 8), 5, torch.float32, device, glu=True)
    torch.library.opcheck(torch.ops.fastnn.linear_glu_fwd.default, (x, wg, wu, bg, None, activation, backend, True))
    y, zg, zu = torch.ops.fastnn.linear_glu_fwd(x.detach(), wg.detach(), wu.detach(), bg.detach(), bu.detach(),
                                                activation, backend, True)
    torch.library.opcheck(torch.ops.fastnn.linear_glu_bwd.default,
                          (torch.randn_like(y), x.detach(), wg.detach(), wu.detach(), bg.detach(), bu.detach(), zg,
                           zu, activation, backend, True, True, True, True, False))


def test_compile_fullgraph_linear_act():
    torch._dynamo.reset()

    def f(x, w, b):
        h = fastnn.linear_act(x, w, b, "gelu")
        return fastnn.linear_act(h, w.t()[:, : h.shape[-1]].contiguous(), None, "relu") * 2

    x, w, b = make_inputs((3, 5, 16), 16, torch.float32, "cpu")
    compiled = torch.compile(f, fullgraph=True)
    check_against_reference(compiled, lambda x, w, b: torch_linear_act(
        torch_linear_act(x, w, b, "gelu"), w.t()[:, :16].contiguous(), None, "relu") * 2, [x, w, b], what="compiled")


def test_compile_fullgraph_linear_glu_dynamic_shapes():
    torch._dynamo.reset()
    f = torch.compile(lambda x, wg, wu, bg, bu: fastnn.linear_glu(x, wg, wu, bg, bu, "swiglu"),
                      fullgraph=True, dynamic=True)
    for rows in (5, 9):
        inputs = make_inputs((rows, 12), 7, torch.float32, "cpu", glu=True)
        check_against_reference(f, lambda x, wg, wu, bg, bu: torch_linear_glu(x, wg, wu, bg, bu, "swiglu"),
                                list(inputs), what=f"compiled glu rows={rows}")
