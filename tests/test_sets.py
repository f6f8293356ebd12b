"""Projections: optimality conditions and idempotence."""
import pytest
import torch

import implicit_nash as inn


def test_simplex_projection_is_exact(gen):
    x = 3 * torch.randn(50, 7, generator=gen)
    p = inn.Simplex().project(x, batch_dims=1)
    assert torch.allclose(p.sum(-1), torch.ones(50)) and (p >= 0).all()
    # KKT of min |p - x|^2 on the simplex: x - p = tau on the support, <= tau off it
    diff = x - p
    for row in range(50):
        s = p[row] > 0
        tau = diff[row][s]
        assert torch.allclose(tau, tau[0].expand_as(tau), atol=1e-12)
        assert (diff[row][~s] <= tau[0] + 1e-12).all()
    assert not torch.equal(p, x) and ((p == 0).sum() > 0)  # non-trivial inputs
    assert torch.allclose(inn.Simplex().project(p, 1), p, atol=1e-14)


def test_ball_box_nonnegative(gen):
    x = 3 * torch.randn(10, 4, generator=gen)
    b = inn.Ball(1.5, center=torch.ones(4)).project(x, batch_dims=1)
    norms = (b - 1).norm(dim=1)
    assert (norms <= 1.5 + 1e-12).all()
    inside = (x - 1).norm(dim=1) <= 1.5
    assert torch.equal(b[inside], x[inside]) and (~inside).any()
    box = inn.Box(-1.0, torch.linspace(0, 1, 4)).project(x)
    assert (box >= -1).all() and (box <= torch.linspace(0, 1, 4)).all()
    assert (inn.NonNegative().project(x) >= 0).all()
    whole = inn.Ball(2.0).project(x, batch_dims=0)
    assert float(whole.norm()) == pytest.approx(2.0)


def test_ball_gradient_is_finite_at_center():
    x = torch.zeros(2, 3, requires_grad=True)
    inn.Ball(1.0).project(x, batch_dims=1).sum().backward()
    assert torch.isfinite(x.grad).all()
