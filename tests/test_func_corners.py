"""torch.func corners of the implicit layer: vmap over any batch dimension, per-member failures
under vmap, failed forwards with throw=False, and which nestings of forward mode are allowed."""
import pytest
import torch
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vmap

import implicit_nash as inn


def F(z, t):  # strongly monotone: dF/dz = 2 + 0.3 cos(z) >= 1.7
    return 2 * z + 0.3 * torch.sin(z) - t


def _data(n=3, m=2, nb=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, m, generator=g), torch.randn(nb, m, generator=g)


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


# ---------------------------------------------------------------- vmap with theta's batch off dim 0
def test_vmap_theta_batched_on_dim1_physically():
    W, xs = _data()
    z0 = torch.zeros(3)

    def f(x):
        return inn.solve_vi(F, z0, W @ x)

    _close(vmap(f)(xs), torch.stack([f(x) for x in xs]))


@pytest.mark.parametrize("in_dim", [0, 1, -1])
def test_vmap_any_in_dim_values_and_grads(in_dim):
    W, xs = _data(nb=5)
    z0 = torch.zeros(3)
    arg = xs if in_dim == 0 else xs.T.contiguous()

    def f(x):
        return inn.solve_vi(F, z0, W @ x)

    def loss(x):
        return (f(x) ** 2).sum()

    ref = torch.stack([f(x) for x in xs])
    out = vmap(f, in_dims=in_dim)(arg)
    _close(out, ref)
    gref = torch.stack([torch.func.grad(loss)(x) for x in xs])
    _close(vmap(grad(loss), in_dims=in_dim)(arg), gref)
    jref = torch.stack([jacrev(f)(x) for x in xs])
    _close(vmap(jacrev(f), in_dims=in_dim)(arg), jref)
    _close(vmap(jacfwd(f), in_dims=in_dim)(arg), jref)


def test_vmap_mixed_in_dims_pytree_theta_and_batched_z0():
    W, xs = _data(nb=4)
    c = torch.tensor([0.5, -1.0, 2.0])
    z0s = torch.randn(3, 4, generator=torch.Generator().manual_seed(3))  # batch on dim 1

    def G(z, th):
        a, b = th
        return F(z, a) + 0.1 * b * z

    def f(z0, x, b):
        return inn.solve_vi(G, z0, (W @ x, b))

    def loss(x, z0, b):
        return (f(z0, x, b) * torch.arange(1.0, 4.0)).sum()

    out = vmap(f, in_dims=(1, 0, None))(z0s, xs, c)
    ref = torch.stack([f(z0s[:, i], xs[i], c) for i in range(4)])
    _close(out, ref)
    gx, gb = vmap(grad(loss, argnums=(0, 2)), in_dims=(0, 1, None))(xs, z0s, c)
    for i in range(4):
        rx, rb = grad(loss, argnums=(0, 2))(xs[i], z0s[:, i], c)
        _close(gx[i], rx)
        _close(gb[i], rb)
    # the gradient of the batch (vmap inside grad) sums the members' gradients of c
    total = grad(lambda b: vmap(lambda x, z0: loss(x, z0, b), in_dims=(0, 1))(xs, z0s).sum())(c)
    _close(total, gb.sum(0))


def test_nested_vmap_any_dims():
    W, _ = _data()
    xs = torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(5))  # (nb1, nb2, m)
    z0 = torch.zeros(3)

    def f(x):
        return inn.solve_vi(F, z0, W @ x)

    ref = torch.stack([torch.stack([f(x) for x in row]) for row in xs])
    _close(vmap(vmap(f))(xs), ref)
    _close(vmap(vmap(f, in_dims=1), in_dims=0)(xs.transpose(1, 2)), ref)
    _close(vmap(vmap(f, in_dims=0), in_dims=1)(xs.transpose(0, 1)), ref)
    jref = torch.stack([torch.stack([jacrev(f)(x) for x in row]) for row in xs])
    _close(vmap(vmap(jacrev(f), in_dims=1), in_dims=0)(xs.transpose(1, 2)), jref)


def test_custom_root_vmap_theta_on_dim1():
    W, xs = _data()

    @inn.custom_root(lambda z, t: z ** 3 + z - t)
    def solve(z0, t):
        z = z0.clone()
        for _ in range(60):  # Newton
            z = z - (z ** 3 + z - t) / (3 * z ** 2 + 1)
        return z

    z0 = torch.zeros(3)

    def f(x):
        return solve(z0, W @ x)

    _close(vmap(f)(xs), torch.stack([f(x) for x in xs]))
    _close(vmap(jacrev(f), in_dims=1)(xs.T), torch.stack([jacrev(f)(x) for x in xs]))


# ---------------------------------------------------------------- one failed member of a vmapped batch
def _degenerate_root(throw):
    """z* = c, with residual Jacobian a: singular (the backward solve fails) where a = 0."""
    @inn.custom_root(lambda z, t: t[0] * (z - t[1]) + (z - t[1]) ** 3, throw=throw)
    def solve(z0, t):
        return t[1].clone()
    return solve


TS = torch.tensor([[1.0, 0.5], [0.0, -0.25], [2.0, 1.5]])
EXPECTED = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 1.0]])


@pytest.mark.parametrize("order", ["vmap_of_jacrev", "jacrev_of_vmap"])
def test_backward_failure_zeroes_only_that_member(order):
    solve = _degenerate_root(False)
    z0 = torch.zeros(())

    def f(t):
        return solve(z0, t)

    # jacrev of a vmap adds a vmap of its own over the cotangents (outermost): member (1, 1) of that
    match = r"member \(1, 1\) of the nested vmapped batches of sizes 3 x 3" if order == "jacrev_of_vmap" \
        else r"member 1 of the vmapped batch"
    with pytest.warns(inn.ConvergenceWarning, match=match):
        if order == "vmap_of_jacrev":
            J = vmap(jacrev(f))(TS)
        else:
            J = jacrev(lambda ts: vmap(f)(ts))(TS)
            J = torch.stack([J[i, i] for i in range(3)])
    _close(J, EXPECTED)


@pytest.mark.parametrize("mode", ["jacrev", "jacfwd"])
def test_linear_solve_budget_fails_one_member_only(mode):
    """GMRES with two products solves an identity block but not one with four distinct eigenvalues."""
    d = torch.arange(4.0)
    ts = torch.tensor([0.0, 1.0, 0.0])

    def f(t):
        return inn.solve_vi(lambda z, t: (1 + t * d) * z - 1, torch.zeros(4), t,
                            adjoint=inn.Implicit(linear_solver=inn.GMRES(max_steps=2)), throw=False)

    with pytest.warns(inn.ConvergenceWarning, match=r"member 1 of the vmapped batch.*max_steps"):
        if mode == "jacrev":  # a cotangent of ones (a basis vector is an eigenvector: one product)
            J = vmap(grad(lambda t: f(t).sum()))(ts)
        else:
            J = vmap(jacfwd(f))(ts).sum(-1)
    _close(J[[0, 2]], torch.full((2,), -6.0))
    assert J[1] == 0


def test_backward_failure_under_vmap_throw_names_member():
    solve = _degenerate_root(True)
    z0 = torch.zeros(())
    with pytest.raises(inn.ConvergenceError, match=r"member 1 of the vmapped batch"):
        vmap(jacrev(lambda t: solve(z0, t)))(TS)


def test_forward_failure_zeroes_only_that_member():
    ts = torch.tensor([2.0, -1.0, 4.0])  # t = -1: t z - 1 is not monotone, the forward diverges

    def f(t):
        return inn.solve_vi(lambda z, t: t * z - 1, torch.zeros(()), t, throw=False)

    with pytest.warns(inn.ConvergenceWarning, match=r"member 1 of the vmapped batch.*derivative through it "
                                                    r"is set to zero"):
        g = vmap(grad(f))(ts)
    _close(g[[0, 2]], -1 / ts[[0, 2]] ** 2)
    assert g[1] == 0
    with pytest.warns(inn.ConvergenceWarning, match=r"member 1 of the vmapped batch"):
        g2 = torch.diagonal(jacrev(vmap(f))(ts))
    _close(g2, g)
    with pytest.warns(inn.ConvergenceWarning, match=r"member 1 of the vmapped batch"):
        g3 = vmap(jacfwd(f))(ts)
    _close(g3, g)


def test_forward_failure_throw_names_member():
    ts = torch.tensor([2.0, -1.0, 4.0])
    with pytest.raises(inn.ConvergenceError, match=r"member 1 of the vmapped batch"):
        vmap(lambda t: inn.solve_vi(lambda z, t: t * z - 1, torch.zeros(()), t))(ts)


# ---------------------------------------------------------------- a failed forward with throw=False
def _diverging(t):
    return inn.solve_vi(lambda z, t: t * z - 1, torch.zeros(()), t, throw=False)


def test_failed_forward_returns_value_and_zero_derivative_every_mode():
    t = torch.tensor(-1.0, requires_grad=True)
    with pytest.warns(inn.ConvergenceWarning, match="the derivative through it is set to zero"):
        z = _diverging(t)
    assert torch.isfinite(z) and abs(z.item()) > 1e3  # the last iterate is returned
    (g,) = torch.autograd.grad(z, t, create_graph=True)
    assert g.item() == 0.0
    if g.requires_grad:
        (h,) = torch.autograd.grad(g, t, allow_unused=True)
        assert h is None or h.item() == 0.0
    t0 = t.detach()
    for fn in (grad(_diverging), jacfwd(_diverging), jacrev(jacrev(_diverging)), jacfwd(jacrev(_diverging)),
               jacrev(jacfwd(_diverging)), hessian(_diverging)):
        with pytest.warns(inn.ConvergenceWarning, match="the derivative through it is set to zero"):
            assert fn(t0).item() == 0.0
    with pytest.warns(inn.ConvergenceWarning, match="the derivative through it is set to zero"):
        _, tangent = jvp(_diverging, (t0,), (torch.ones(()),))
    assert tangent.item() == 0.0


def test_failed_forward_max_steps_and_not_a_root_zero_derivative():
    t = torch.tensor(0.5, requires_grad=True)
    with pytest.warns(inn.ConvergenceWarning, match="the derivative through it is set to zero"):
        z = inn.solve_vi(F, torch.zeros(()), t, solver=inn.PRGD(max_steps=2), throw=False)
    assert torch.autograd.grad(z, t)[0].item() == 0.0

    @inn.custom_root(lambda z, th: z - th, throw=False)
    def wrong(z0, th):
        return th + 1.0

    with pytest.warns(inn.ConvergenceWarning, match="the derivative through it is set to zero"):
        z = wrong(torch.zeros(()), t)
    assert z.item() == 1.5
    assert torch.autograd.grad(z, t)[0].item() == 0.0


def test_common_args_doc_says_failed_forward_derivative_is_zero():
    assert "a failed forward solve's derivative is zero" in inn.solve_vi.__doc__.replace("\n", " ").replace(
        "        ", " ").replace("  ", " ")


# ---------------------------------------------------------------- which nestings of forward mode
def _cube(th):  # z^3 + z = th
    return inn.solve_vi(lambda z, t: z ** 3 + z - t, torch.zeros(()), th)


@inn.custom_root(lambda z, t: z ** 3 + z - t)
def _cube_root(z0, t):
    z = z0.clone()
    for _ in range(60):
        z = z - (z ** 3 + z - t) / (3 * z ** 2 + 1)
    return z


def _cube_cr(th):
    return _cube_root(torch.zeros(()), th)


THETA = torch.tensor(2.0)  # z = 1: z' = 1/4, z'' = -6 z z'^3 = -0.09375, z''' = 0.08203125


@pytest.mark.parametrize("solve", [_cube, _cube_cr])
def test_allowed_nestings_match_closed_form(solve):
    second = torch.tensor(-0.09375)
    third = torch.tensor(0.08203125)
    _close(jacfwd(solve)(THETA), torch.tensor(0.25))
    for fn in (jacrev(jacrev(solve)), jacfwd(jacrev(solve)), jacrev(jacfwd(solve)), hessian(solve)):
        _close(fn(THETA), second)
    for fn in (jacrev(jacrev(jacrev(solve))), jacfwd(jacrev(jacrev(solve))), jacrev(jacrev(jacfwd(solve)))):
        _close(fn(THETA), third)


@pytest.mark.parametrize("solve", [_cube, _cube_cr])
def test_forward_over_forward_is_refused(solve):
    msg = r"forward-over-forward.*jacrev\(jacrev\(\.\.\.\)\), jacfwd\(jacrev\(\.\.\.\)\) or jacrev\(jacfwd"
    one = torch.ones(())
    for fn in (jacfwd(jacfwd(solve)), jacfwd(jacfwd(jacrev(solve))), jacrev(jacfwd(jacfwd(solve))),
               jacfwd(jacrev(jacfwd(solve))), lambda t: jvp(lambda s: jvp(solve, (s,), (one,))[1], (t,), (one,))[1]):
        with pytest.raises(ValueError, match=msg):
            fn(THETA)


def test_nested_forward_ad_dual_levels_do_not_return_a_wrong_value():
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        t = fwAD.make_dual(THETA, torch.ones(()))
        z = _cube(t)
        _close(fwAD.unpack_dual(z).tangent, torch.tensor(0.25))
    with pytest.raises(Exception):
        with fwAD.dual_level():
            with fwAD.dual_level():
                pass


def test_failed_forward_zero_derivative_unrolled_and_forward_ad():
    import torch.autograd.forward_ad as fwAD
    t = torch.tensor(-1.0, requires_grad=True)
    with pytest.warns(inn.ConvergenceWarning, match="the derivative through it is set to zero"):
        z = inn.solve_vi(lambda z, t: t * z - 1, torch.zeros(()), t, adjoint=inn.Unrolled(), throw=False)
    assert torch.autograd.grad(z, t)[0].item() == 0.0
    with fwAD.dual_level():
        with pytest.warns(inn.ConvergenceWarning, match="the derivative through it is set to zero"):
            z = _diverging(fwAD.make_dual(torch.tensor(-1.0), torch.ones(())))
        assert fwAD.unpack_dual(z).tangent.item() == 0.0


def test_custom_root_blocks_one_failed_block_zeroes_only_it():
    @inn.custom_root(lambda z, th: z - th, throw=False, blocks=3)
    def solve(z0, th):
        return th + torch.tensor([[0.0], [1.0], [0.0]])  # block 1 is not a root

    th = torch.tensor([[1.0], [2.0], [3.0]], requires_grad=True)
    with pytest.warns(inn.ConvergenceWarning, match=r"\(block 1\).*derivative through it is set to zero"):
        z = solve(torch.zeros(3, 1), th)
    (g,) = torch.autograd.grad(z.sum(), th)
    _close(g, torch.tensor([[1.0], [0.0], [1.0]]))


def test_second_order_under_vmap_with_a_failed_member():
    ts = torch.tensor([2.0, -1.0, 4.0])

    def f(t):
        return inn.solve_vi(lambda z, t: t * z - 1, torch.zeros(()), t, throw=False)

    with pytest.warns(inn.ConvergenceWarning, match=r"member 1 of the vmapped batch"):
        h = vmap(jacrev(jacrev(f)))(ts)
    _close(h[[0, 2]], 2 / ts[[0, 2]] ** 3)  # z = 1/t: z'' = 2/t^3
    assert h[1] == 0


def test_custom_root_non_finite_member_fails_alone():
    @inn.custom_root(lambda z, t: t * z - 1, throw=False)
    def inverse(z0, t):
        return 1 / t  # inf at t = 0

    ts = torch.tensor([2.0, 0.0, 4.0])
    with pytest.warns(inn.ConvergenceWarning, match=r"non_finite.*member 1 of the vmapped batch"):
        z = vmap(lambda t: inverse(torch.zeros(()), t))(ts)
    assert torch.isinf(z[1]) and bool(torch.isfinite(z[[0, 2]]).all())
    with pytest.warns(inn.ConvergenceWarning, match=r"member 1 of the vmapped batch"):
        g = vmap(grad(lambda t: inverse(torch.zeros(()), t)))(ts)
    _close(g[[0, 2]], -1 / ts[[0, 2]] ** 2)
    assert g[1] == 0


def test_linear_solve_info_group_statuses():
    d = torch.tensor([2.0, 2.0, 2.0, 2.0, 1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])  # block 1 needs four products
    x, info = inn.GMRES(max_steps=2).solve(torch.diag(d), torch.ones(12), groups=3)
    assert not info.converged
    assert info.group_statuses == ["converged", "max_steps", "converged"]
    _, info = inn.GMRES().solve(torch.diag(d), torch.ones(12), groups=3)
    assert info.converged and info.group_statuses == ["converged"] * 3
    _, info = inn.GMRES().solve(torch.diag(d), torch.ones(12))
    assert info.group_statuses == []


def test_jacfwd_through_a_layer_nested_in_the_operator_is_allowed():
    A = torch.tensor([[2.0, 1.0], [-1.0, 2.0]])

    def inner(t):
        return inn.solve_vi(lambda y, s: 2 * y + 0.3 * torch.sin(y) - s, torch.zeros(2), t)

    def outer(th):
        return inn.solve_vi(lambda z, t: A @ z + inner(z + t) - 1.0, torch.zeros(2), th)

    th = torch.tensor([0.3, -0.2])
    _close(jacfwd(outer)(th), jacrev(outer)(th))
