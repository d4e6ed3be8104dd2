"""torch.func and forward-mode AD through fastnn: vmap, grad, jacrev, jacfwd, jvp, per-sample
gradients (functional_call under vmap, as Opacus-style code does) and vectorised jacobians give
PyTorch's results. Under a transform fastnn runs PyTorch's composite (its kernels read raw
pointers, which functorch's wrapped tensors do not have); a backward vmapped over its grad outputs
runs the composite backward."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vmap

import fastnn

@pytest.fixture(autouse=True)
def _float64():
    """float64 by default here: the comparisons are of the same math, so they can be tight."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _ref_act(x, w, b, act="gelu"):
    return fastnn.activations.get(act).fn(F.linear(x, w, b))


def _ref_glu(x, wg, wu, bg, bu, act="swiglu"):
    return fastnn.activations.get_gated(act).fn(F.linear(x, wg, bg)) * F.linear(x, wu, bu)


def _args(n_in=5, n_out=7):
    return torch.randn(n_out, n_in), torch.randn(n_out)


@pytest.mark.parametrize("act", ["gelu", "relu", "silu", "identity"])
def test_vmap_grad_jacrev_jacfwd_jvp(act):
    w, b = _args()
    xs = torch.randn(4, 3, 5)
    ours = vmap(lambda x: fastnn.linear_act(x, w, b, act))(xs)
    torch.testing.assert_close(ours, _ref_act(xs, w, b, act))
    x = xs[0]
    g_ours = grad(lambda w_: fastnn.linear_act(x, w_, b, act).square().sum())(w)
    g_ref = grad(lambda w_: _ref_act(x, w_, b, act).square().sum())(w)
    torch.testing.assert_close(g_ours, g_ref)
    for jac in (jacrev, jacfwd):
        torch.testing.assert_close(jac(lambda t: fastnn.linear_act(t, w, b, act))(x[0]),
                                   jac(lambda t: _ref_act(t, w, b, act))(x[0]))
    tangent = torch.randn_like(x)
    torch.testing.assert_close(jvp(lambda t: fastnn.linear_act(t, w, b, act), (x,), (tangent,)),
                               jvp(lambda t: _ref_act(t, w, b, act), (x,), (tangent,)))


def test_linear_glu_under_transforms():
    (wg, bg), (wu, bu) = _args(), _args()
    xs = torch.randn(4, 5)
    torch.testing.assert_close(vmap(lambda x: fastnn.linear_glu(x, wg, wu, bg, bu))(xs), _ref_glu(xs, wg, wu, bg, bu))
    torch.testing.assert_close(jacrev(lambda t: fastnn.linear_glu(t, wg, wu, bg, bu))(xs[0]),
                               jacrev(lambda t: _ref_glu(t, wg, wu, bg, bu))(xs[0]))
    torch.testing.assert_close(jacfwd(lambda t: fastnn.linear_glu(t, wg, wu, bg, bu, "geglu"))(xs[0]),
                               jacfwd(lambda t: _ref_glu(t, wg, wu, bg, bu, "geglu"))(xs[0]))


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_per_sample_gradients(activation):
    model = fastnn.FusedMLP(6, 12, out_features=3, activation=activation)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, target = torch.randn(5, 6), torch.randn(5, 3)

    def loss(p, xi, ti):
        return F.mse_loss(functional_call(model, p, (xi[None],)), ti[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, target)
    for i in range(5):
        model.zero_grad()
        F.mse_loss(model(x[i:i + 1]), target[i:i + 1]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad)


@pytest.mark.parametrize("activation", ["gelu", "relu", "swiglu"])
def test_vectorized_jacobian_runs_the_composite_backward(activation):
    """Forward runs fastnn's kernel (no transform then); the backward is vmapped over grad outputs."""
    model = fastnn.FusedMLP(4, 8, out_features=3, activation=activation)
    x = torch.randn(2, 4)
    vectorized = torch.autograd.functional.jacobian(model, x, vectorize=True)
    looped = torch.autograd.functional.jacobian(model, x, vectorize=False)
    torch.testing.assert_close(vectorized, looped)
    x.requires_grad_()
    y = model(x)
    batched = torch.autograd.grad(y, x, torch.eye(6).reshape(6, 2, 3), is_grads_batched=True)[0]
    torch.testing.assert_close(batched, looped.reshape(6, 2, 4))


def test_vectorized_jacobian_without_kept_input_says_why():
    w = torch.randn(3, 4)  # frozen: forward keeps only the weight, as F.linear would
    x = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="vectorize=False"):
        torch.autograd.functional.jacobian(lambda t: fastnn.linear_act(t, w, None, "gelu"), x, vectorize=True)


def test_explicit_backend_under_a_transform_is_an_error():
    w, b = _args()
    with pytest.raises(fastnn.BackendUnavailableError, match="torch.func"):
        vmap(lambda x: fastnn.linear_act(x, w, b, "gelu", backend="cpu"))(torch.randn(2, 5))
    out = vmap(lambda x: fastnn.linear_act(x, w, b, "gelu", backend="torch"))(torch.randn(2, 5))
    assert out.shape == (2, 7)


def test_forward_mode_ad_outside_functorch():
    import torch.autograd.forward_ad as fwAD
    w, b = _args()
    x, t = torch.randn(3, 5), torch.randn(3, 5)
    with fwAD.dual_level():
        ours = fwAD.unpack_dual(fastnn.linear_act(fwAD.make_dual(x, t), w, b, "tanh")).tangent
        ref = fwAD.unpack_dual(_ref_act(fwAD.make_dual(x, t), w, b, "tanh")).tangent
    torch.testing.assert_close(ours, ref)


def test_modules_under_vmap():
    layer = fastnn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    ref = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    ref.load_state_dict(layer.state_dict())
    mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    fused = fastnn.fuse(nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)))
    fused.load_state_dict(mlp.state_dict())
    xs = torch.randn(3, 2, 4, 8)
    torch.testing.assert_close(vmap(layer)(xs), vmap(ref)(xs))
    torch.testing.assert_close(vmap(fused)(xs), vmap(mlp)(xs))
