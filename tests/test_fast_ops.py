"""Conv-4's fast layers (implicit_nash.tasks._fast_ops) against PyTorch's own, float64: values, first
and second derivatives; and second-order MAML through Conv4(fast=True) against Conv4(fast=False)."""
import pytest
import torch
import torch.nn.functional as nnf

from implicit_nash.meta import CAVIA, MAML, MetaSGD
from implicit_nash.tasks import Conv4
from implicit_nash.tasks import _fast_ops

D = torch.float64


def _second_order(f, inputs, seed=0):
    """Value, first derivatives (with create_graph) and the derivatives of a random projection of the
    first derivatives, for every input that requires grad and for the output's cotangent."""
    g = torch.Generator().manual_seed(seed)
    y = f(*inputs)
    cot = torch.randn(y.shape, generator=g, dtype=D).requires_grad_(True)
    wrt = [t for t in inputs if t.requires_grad]
    firsts = torch.autograd.grad(y, wrt, cot, create_graph=True)
    proj = sum((d * torch.randn(d.shape, generator=g, dtype=D)).sum() for d in firsts)
    seconds = torch.autograd.grad(proj, wrt + [cot], allow_unused=True)
    return [y] + list(firsts) + [torch.zeros_like(t) if s is None else s for s, t in zip(seconds, wrt + [cot])]


def _close(ours, ref):
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-11), float((a - b).abs().max())


def _inputs(shape, seed=1, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=D) * 2 + shift).requires_grad_(True)
    w = (torch.rand(shape[1], generator=g, dtype=D) + 0.5).requires_grad_(True)
    b = torch.randn(shape[1], generator=g, dtype=D).requires_grad_(True)
    return x, w, b


@pytest.mark.parametrize("shape,shift", [((4, 3, 5, 6), 0.0), ((2, 5, 3, 3), 3.0), ((7, 2, 1, 1), -1.0)])
def test_batch_norm_values_and_two_derivatives(shape, shift):
    x, w, b = _inputs(shape, shift=shift)
    ref = _second_order(lambda x, w, b: nnf.batch_norm(x, None, None, w, b, training=True, eps=1e-5), (x, w, b))
    ours = _second_order(lambda x, w, b: _fast_ops.batch_norm(x, w, b, 1e-5), (x, w, b))
    _close(ours, ref)


def test_batch_norm_refuses_one_value_per_channel_as_pytorch_does():
    x, w, b = _inputs((1, 3, 1, 1))
    for f in (lambda: _fast_ops.batch_norm(x, w, b), lambda: nnf.batch_norm(x, None, None, w, b, training=True)):
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            f()


def test_batch_norm_double_backward_with_some_cotangents_missing():
    x, w, b = _inputs((3, 4, 4, 4))
    for keep in ("x", "w", "b"):
        outs = {}
        for name, f in (("ref", lambda: nnf.batch_norm(x, None, None, w, b, training=True)),
                        ("ours", lambda: _fast_ops.batch_norm(x, w, b))):
            y = f()
            gx, gw, gb = torch.autograd.grad((y ** 3).sum(), (x, w, b), create_graph=True)
            use = {"x": gx, "w": gw, "b": gb}[keep]
            outs[name] = torch.autograd.grad((use ** 2).sum(), (x, w, b), allow_unused=True)
        for a, r in zip(outs["ours"], outs["ref"]):
            assert (a is None) == (r is None) or torch.allclose(a if a is not None else torch.zeros_like(r),
                                                                r if r is not None else torch.zeros_like(a),
                                                                rtol=1e-10, atol=1e-11)


def test_batch_norm_third_derivative_against_finite_differences():
    # (PyTorch's own batch norm disagrees with finite differences here in torch 2.13: 3.98 against
    # 3.23 on a case like this one, where ours agrees; so the reference is finite differences.)
    x0, w, b = _inputs((2, 3, 3, 3))
    g = torch.Generator().manual_seed(5)
    R, r1, r2, direction = (torch.randn(x0.shape, generator=g, dtype=D) for _ in range(4))

    def hx_of(x, create_graph):
        gx, = torch.autograd.grad((_fast_ops.batch_norm(x, w, b) * R).sum(), x, create_graph=True)
        hx, = torch.autograd.grad((gx * r1).sum(), x, create_graph=create_graph)
        return hx

    x = x0.clone().requires_grad_(True)
    third, = torch.autograd.grad((hx_of(x, True) * r2).sum(), x)
    h = 1e-5
    plus, minus = ((x0 + s * h * direction).requires_grad_(True) for s in (1, -1))
    fd = ((hx_of(plus, False) - hx_of(minus, False)) * r2).sum() / (2 * h)
    assert torch.allclose((third * direction).sum(), fd, rtol=1e-7)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 6, 8), (1, 2, 5, 7), (3, 1, 2, 2)])
def test_max_pool_values_and_two_derivatives(shape, channels_last):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=D)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    _close(_second_order(_fast_ops.max_pool2x2, (x,)), _second_order(lambda t: nnf.max_pool2d(t, 2), (x,)))


@pytest.mark.parametrize("channels_last", [False, True])
def test_max_pool_ties_go_where_max_pool_sends_them(channels_last):
    x = torch.tensor([[[[1.0, 1.0, 0.0, 2.0], [1.0, 1.0, 2.0, 2.0]]]], dtype=D)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    for f in (_fast_ops.max_pool2x2, lambda t: nnf.max_pool2d(t, 2)):
        gx, = torch.autograd.grad(f(x).sum(), x)
        assert gx.tolist() == [[[[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]]]


def test_input_conv_values_and_two_derivatives():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 5, 6, generator=g, dtype=D)
    w = torch.randn(4, 2, 3, 3, generator=g, dtype=D).requires_grad_(True)
    b = torch.randn(4, generator=g, dtype=D).requires_grad_(True)
    _close(_second_order(_fast_ops.input_conv, (x, w, b)),
           _second_order(lambda x, w, b: nnf.conv2d(x, w, b, padding=1), (x, w, b)))
    with pytest.raises(ValueError, match="needs no gradient"):
        _fast_ops.input_conv(x.requires_grad_(True), w, b)


@pytest.mark.parametrize("bias", [True, False])
def test_conv_values_and_two_derivatives(bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 5, 6, generator=g, dtype=D).requires_grad_(True)
    w = torch.randn(4, 2, 3, 3, generator=g, dtype=D).requires_grad_(True)
    b = torch.randn(4, generator=g, dtype=D).requires_grad_(bias)
    _close(_second_order(_fast_ops.conv, (x, w, b)),
           _second_order(lambda x, w, b: nnf.conv2d(x, w, b, padding=1), (x, w, b)))


def test_conv_double_backward_with_some_cotangents_missing_and_third_derivative():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 4, generator=g, dtype=D).requires_grad_(True)
    w = torch.randn(3, 3, 3, 3, generator=g, dtype=D).requires_grad_(True)
    b = torch.randn(3, generator=g, dtype=D).requires_grad_(True)
    r = torch.randn(2, 3, 4, 4, generator=g, dtype=D)
    for pick in ((0,), (1,), (2,), (0, 1, 2)):
        out = []
        for f in (_fast_ops.conv, lambda x, w, b: nnf.conv2d(x, w, b, padding=1)):
            firsts = torch.autograd.grad((f(x, w, b).pow(2) * r).sum(), (x, w, b), create_graph=True)
            proj = sum(firsts[i].pow(2).sum() for i in pick)
            seconds = torch.autograd.grad(proj, (x, w, b), create_graph=True, allow_unused=True)
            thirds = torch.autograd.grad(sum(s.sum() for s in seconds if s is not None), (x, w, b),
                                         allow_unused=True)
            out.append([torch.zeros(()) if t is None else t for t in seconds + thirds])
        _close(out[0], out[1])


def _batch(size, seed=0, ways=3):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(ways)
    return {"x_support": torch.rand(2, ways * 2, 3, size, size, generator=g, dtype=D),
            "y_support": labels.repeat_interleave(2).expand(2, -1).clone(),
            "x_query": torch.rand(2, ways * 3, 3, size, size, generator=g, dtype=D),
            "y_query": labels.repeat_interleave(3).expand(2, -1).clone()}


@pytest.mark.parametrize("algo", [MAML(inner_steps=2, inner_lr=0.1, loss="cross_entropy"),
                                  MAML(inner_steps=2, inner_lr=0.1, loss="cross_entropy", meta_gradient="first_order"),
                                  MetaSGD(inner_steps=2, inner_lr=0.1, loss="cross_entropy"),
                                  CAVIA(inner_steps=2, inner_lr=1.0, loss="cross_entropy", context_dim=3)],
                         ids=["maml", "fomaml", "metasgd", "cavia"])
@pytest.mark.parametrize("size", [11, 16])
def test_meta_gradient_of_fast_conv4_equals_pytorch_layers(algo, size):
    batch = _batch(size)
    grads = {}
    for fast in (True, False):
        torch.manual_seed(0)
        model = Conv4(3, 4, 3, size, context_dim=getattr(algo, "context_dim", 0), fast=fast).to(D)
        theta = algo.init(model)
        loss = algo.outer_loss(algo.task_losses(model, theta, batch), batch, {})
        leaves = [t for t in torch.utils._pytree.tree_leaves(theta) if t.requires_grad]
        grads[fast] = [loss.detach()] + list(torch.autograd.grad(loss, leaves))
    for a, b in zip(grads[True], grads[False]):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), float((a - b).abs().max())


def test_fast_conv4_falls_back_under_vmap_and_equals_it():
    torch.manual_seed(0)
    model = Conv4(3, 4, 3, 8).to(D)
    x = torch.rand(2, 5, 3, 8, 8, dtype=D)
    looped = torch.stack([model(x[i]) for i in range(2)])
    assert torch.allclose(torch.vmap(model)(x), looped, rtol=1e-12, atol=1e-13)
