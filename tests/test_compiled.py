"""Compiled conjugate gradients (issue 16): ``CG(compiled=True)`` runs the iteration in chunks traced
whole by ``torch.compile``, the products included.  It must return what the eager method returns (to
the tolerance, with the same stopping rule and budget), report failures the same way, and say when it
ran eagerly instead.  Most tests use the ``aot_eager`` backend (dynamo's trace and AOT autograd, no C++
compiler, seconds); one uses inductor, the default."""
import pytest
import torch

import implicit_nash as inn
from implicit_nash.linear_solve import LinearOperator

AOT = {"compiled": True, "backend": "aot_eager"}


def _spd(n, scale, seed):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    return (Q * torch.linspace(1.0, scale, n)) @ Q.T


def _stack(scales, n=20):
    blocks = [_spd(n, s, i) for i, s in enumerate(scales)]
    A = torch.block_diag(*blocks)
    b = torch.randn(A.shape[0], generator=torch.Generator().manual_seed(9))
    return A, b


@pytest.mark.parametrize("chunk", [1, 4, 10])
@pytest.mark.parametrize("scales", [(100.0,), (100.0, 3.0, 1000.0)], ids=["one", "three_blocks"])
def test_compiled_cg_returns_what_eager_cg_returns(chunk, scales):
    A, b = _stack(scales)
    groups = len(scales)
    x_e, eager = inn.CG(rtol=1e-11).solve(A, b, groups=groups)
    x_c, comp = inn.CG(rtol=1e-11, chunk=chunk, **AOT).solve(A, b, groups=groups)
    assert eager.converged and comp.converged, comp.message
    assert "compiled in chunks" in comp.message
    x_star = torch.linalg.solve(A, b)
    assert torch.allclose(x_c, x_star, rtol=0, atol=1e-8 * x_star.norm())
    assert (A @ x_c - b).reshape(groups, -1).norm(dim=1).max() <= comp.tolerance * (1 + 1e-12)
    # each block freezes at the same iteration as in the eager method: the same iterate, and no more
    # products than a chunk's rounding, and, for one block, the error estimate's Arnoldi run of 20
    # products (the eager method reads sigma_min off its Lanczos coefficients; the chunks keep none)
    assert torch.allclose(x_c, x_e, rtol=1e-9, atol=1e-12)
    assert eager.matvecs <= comp.matvecs <= eager.matvecs + chunk + (20 if groups == 1 else 0)


def test_compiled_cg_keeps_the_product_budget():
    A, b = _stack((1e4,))
    _, eager = inn.CG(rtol=1e-12, max_steps=7).solve(A, b)
    _, comp = inn.CG(rtol=1e-12, max_steps=7, chunk=5, **AOT).solve(A, b)
    assert eager.status == comp.status == "max_steps"
    # the symmetry test (2), 7 steps (5 in a compiled chunk, the last 2 eagerly) and the final check
    assert comp.matvecs == eager.matvecs == 10 and comp.steps == 7


def test_compiled_cg_reports_breakdown_and_non_finite_like_eager_cg():
    A, b = _stack((100.0,))
    x, info = inn.CG(**AOT).solve(A - 50 * torch.eye(A.shape[0]), b)
    assert info.status == "breakdown" and "ran eagerly" in info.message and "not positive definite" in info.message
    op = LinearOperator(lambda v: v * float("nan"), symmetric=True,
                        functional=(lambda v: v * float("nan"), ()))
    x, info = inn.CG(**AOT).solve(op, b)
    assert info.status == "non_finite" and not info.converged


def test_compiled_cg_says_when_it_ran_eagerly():
    A, b = _stack((10.0,))
    x_star = torch.linalg.solve(A, b)
    x, info = inn.CG(rtol=1e-12, **AOT).solve(lambda v: A @ v, b)          # a bare callable: no functional form
    assert info.converged and "ran eagerly: the operator has no functional form" in info.message
    assert torch.allclose(x, x_star, atol=1e-9)

    def refuses_tracing(v, M):
        if torch.compiler.is_compiling():
            raise RuntimeError("not traceable")
        return M @ v

    op = LinearOperator(lambda v: A @ v, symmetric=True, functional=(refuses_tracing, (A,)))
    x, info = inn.CG(rtol=1e-12, **AOT).solve(op, b)
    assert info.converged and "ran eagerly: the compiled chunk failed (" in info.message, info.message
    assert torch.allclose(x, x_star, atol=1e-9)


def test_refined_with_a_compiled_inner_cg():
    A, b = _stack((100.0, 10.0))
    x, info = inn.Refined(solver=inn.CG(**AOT), rtol=1e-11).solve(A, b, groups=2)
    assert info.converged and "refinement" in info.message, info.message
    assert torch.allclose(x, torch.linalg.solve(A, b), atol=1e-8)


def test_compiled_cg_under_inductor():
    A, b = _stack((50.0, 5.0), n=6)
    x, info = inn.CG(rtol=1e-12, compiled=True, chunk=3).solve(A, b, groups=2)
    assert info.converged and "backend inductor" in info.message, info.message
    assert torch.allclose(x, torch.linalg.solve(A, b), atol=1e-10)


def test_bad_compiled_options_are_refused():
    with pytest.raises(ValueError, match="chunk"):
        inn.CG(compiled=True, chunk=0)
    with pytest.raises(TypeError, match="compiled"):
        inn.CG(compiled="yes")
    with pytest.raises(ValueError, match="backend"):
        inn.CG(compiled=True, backend="")
    with pytest.raises(TypeError, match="functional"):
        LinearOperator(lambda v: v, functional=lambda v: v)


# ------------------------------------------------------------------ through the layer
LAM = 3.0


def _imaml(n_tasks=3, d=5, seed=0):
    """A small iMAML-style inner problem: per task, a tanh regression loss + lam/2 ||phi - theta||^2."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n_tasks, 8, d, generator=g)
    Y = torch.randn(n_tasks, 8, generator=g)

    def loss(phi, x, y):
        return 0.5 * ((torch.tanh(x @ phi) - y) ** 2).mean()

    task_grad = torch.func.vmap(torch.func.grad(loss))

    def residual(phi, theta):
        return task_grad(phi, X, Y) + LAM * (phi - theta)

    def newton(phi0, theta):
        phi = phi0.clone()
        for _ in range(30):
            J = torch.func.jacrev(lambda p: residual(p, theta).reshape(-1))(phi).reshape(phi.numel(), -1)
            phi = phi - torch.linalg.solve(J, residual(phi, theta).reshape(-1)).reshape(phi.shape)
        return phi

    theta = torch.randn(d, generator=g).requires_grad_(True)
    return residual, newton, theta, torch.zeros(n_tasks, d), torch.randn(n_tasks, d, generator=g)


@pytest.mark.parametrize("blocks", [1, 3])
def test_layer_gradients_with_compiled_cg_equal_eager_dense_and_finite_differences(blocks):
    residual, newton, theta, z0, c = _imaml()
    grads, hvps = {}, {}
    for name, solver in (("eager", inn.CG(rtol=1e-12)), ("compiled", inn.CG(rtol=1e-12, chunk=3, **AOT)),
                         ("dense", inn.Dense())):
        solve = inn.custom_root(residual, linear_solver=solver, symmetric=True, blocks=blocks)(newton)
        out = (solve(z0, theta) * c).sum() ** 2
        (g,) = torch.autograd.grad(out, theta, create_graph=True)
        grads[name] = g.detach()
        # second order: the gradient of <g, v> (a Hessian-vector product of the outer objective)
        hvps[name] = torch.autograd.grad((g * torch.linspace(-1, 1, g.numel())).sum(), theta)[0]
    assert torch.allclose(grads["compiled"], grads["dense"], rtol=1e-8, atol=1e-10)
    assert torch.allclose(grads["compiled"], grads["eager"], rtol=1e-9, atol=1e-11)
    assert torch.allclose(hvps["compiled"], hvps["dense"], rtol=1e-7, atol=1e-9)
    # finite differences of the whole map theta -> outer objective
    eps, e = 1e-6, torch.zeros_like(theta)
    e[1] = 1.0
    with torch.no_grad():
        f = lambda th: ((newton(z0, th) * c).sum() ** 2).item()
        fd = (f(theta + eps * e) - f(theta - eps * e)) / (2 * eps)
    assert abs(fd - float(grads["compiled"][1])) <= 1e-6 * max(1.0, abs(fd))


def test_layer_products_are_compiled_also_under_grad_and_vmap():
    residual, newton, theta, z0, c = _imaml()
    seen = []

    class Seen(inn.CG):
        def solve(self, *a, **k):
            x, info = super().solve(*a, **k)
            seen.append(info)
            return x, info

    solve = inn.custom_root(residual, linear_solver=Seen(rtol=1e-12, chunk=4, **AOT), symmetric=True)(newton)
    g_plain = torch.autograd.grad((solve(z0, theta) * c).sum(), theta)[0]
    assert "compiled in chunks of 4" in seen[-1].message, seen[-1].message
    # one level of torch.func.grad: the backward runs on plain tensors, and compiles as well
    g_func = torch.func.grad(lambda th: (solve(z0, th) * c).sum())(theta.detach())
    assert "compiled in chunks of 4" in seen[-1].message, seen[-1].message
    assert torch.allclose(g_func, g_plain, rtol=1e-10, atol=1e-12)
    # under vmap the layer stacks the problems into one (groups): compiled too
    thetas = torch.stack([theta.detach(), 1.1 * theta.detach()])
    g_vmap = torch.func.vmap(torch.func.grad(lambda th: (solve(z0, th) * c).sum()))(thetas)
    assert "compiled in chunks of 4" in seen[-1].message and seen[-1].group_residuals, seen[-1].message
    g_two = torch.autograd.grad((solve(z0, 1.1 * theta) * c).sum(), theta)[0] / 1.1
    assert torch.allclose(g_vmap[0], g_plain, rtol=1e-10, atol=1e-12)
    assert torch.allclose(g_vmap[1], g_two, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ compiled BiCGSTAB (non-symmetric)
def _nonsymmetric(n, seed, skew=0.4):
    g = torch.Generator().manual_seed(seed)
    K = torch.randn(n, n, generator=g)
    return _spd(n, 20.0, seed) + skew * (K - K.T)


@pytest.mark.parametrize("groups", [1, 3])
def test_compiled_bicgstab_solves_non_symmetric_systems(groups):
    A = torch.block_diag(*[_nonsymmetric(15, i) for i in range(groups)])
    b = torch.randn(A.shape[0], generator=torch.Generator().manual_seed(5))
    _, eager = inn.BiCGSTAB(rtol=1e-11).solve(A, b, groups=groups)
    x, info = inn.BiCGSTAB(rtol=1e-11, chunk=3, **AOT).solve(A, b, groups=groups)
    assert eager.converged and info.converged and "compiled in chunks of 3" in info.message, info.message
    x_star = torch.linalg.solve(A, b)
    assert torch.allclose(x, x_star, rtol=0, atol=1e-8 * x_star.norm())
    assert (A @ x - b).reshape(groups, -1).norm(dim=1).max() <= info.tolerance * (1 + 1e-12)
    # two products per iteration; the chunk's end may add up to chunk - 1 iterations (+ the final check)
    assert info.matvecs <= eager.matvecs + 2 * 3 + 1


def test_compiled_bicgstab_hands_a_breakdown_to_the_eager_method():
    n = 10
    K = torch.randn(n, n, generator=torch.Generator().manual_seed(2))
    S = K - K.T                                     # skew-symmetric: r'Ar = 0 breaks BiCGSTAB
    b = torch.randn(n, generator=torch.Generator().manual_seed(3))
    _, eager = inn.BiCGSTAB(rtol=1e-10).solve(S, b)
    _, info = inn.BiCGSTAB(rtol=1e-10, **AOT).solve(S, b)
    assert info.status == eager.status and "ran eagerly: a chunk met a breakdown" in info.message, info.message


def test_layer_gradients_with_compiled_bicgstab_on_a_non_symmetric_game():
    """A two-player bilinear-plus-quadratic game (non-symmetric Jacobian): first and second order
    through custom_root with a compiled BiCGSTAB, against a dense solve."""
    g = torch.Generator().manual_seed(4)
    M = torch.randn(4, 4, generator=g)

    def residual(z, theta):  # player 1 minimises, player 2 maximises z1' M z2, plus tanh terms
        z1, z2 = z[:4], z[4:]
        return torch.cat([2 * z1 + torch.tanh(z1) + M @ z2 - theta[:4], 2 * z2 + torch.tanh(z2) - M.T @ z1 - theta[4:]])

    def newton(z0, theta):
        z = z0.clone()
        for _ in range(40):
            J = torch.func.jacrev(lambda v: residual(v, theta))(z)
            z = z - torch.linalg.solve(J, residual(z, theta))
        return z

    theta = torch.randn(8, generator=g).requires_grad_(True)
    c = torch.randn(8, generator=g)
    out = {}
    for name, solver in (("compiled", inn.BiCGSTAB(rtol=1e-12, chunk=2, **AOT)), ("dense", inn.Dense())):
        solve = inn.custom_root(residual, linear_solver=solver, symmetric=False)(newton)
        (gr,) = torch.autograd.grad((solve(torch.zeros(8), theta) * c).sum() ** 2, theta, create_graph=True)
        hv = torch.autograd.grad((gr * torch.linspace(-1, 1, 8)).sum(), theta)[0]
        out[name] = (gr.detach(), hv)
    assert torch.allclose(out["compiled"][0], out["dense"][0], rtol=1e-8, atol=1e-10)
    assert torch.allclose(out["compiled"][1], out["dense"][1], rtol=1e-7, atol=1e-9)
