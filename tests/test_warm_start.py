"""Warm starts of the implicit linear solves (issue 16): a start changes how many products a solve
makes, never what it returns.  Every solver from x0 against a dense solve; bad starts discarded per
block; the layer's WarmStart across calls, under torch.func (where it must stay out of the way) and
at second order."""
import pytest
import torch

import implicit_nash as inn


def _system(n=12, seed=0, symmetric=True):
    g = torch.Generator().manual_seed(seed)
    K = torch.randn(n, n, generator=g)
    A = K @ K.T / n + torch.eye(n) if symmetric else torch.eye(n) * 2 + (K - K.T) / 3
    b = torch.randn(n, generator=g)
    return A, b, torch.linalg.solve(A, b), g


SOLVERS = [inn.CG(rtol=1e-12), inn.GMRES(rtol=1e-12), inn.BiCGSTAB(rtol=1e-12), inn.NormalCG(rtol=1e-12)]


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
def test_a_near_start_saves_products_and_changes_nothing(solver):
    A, b, x_star, g = _system()
    x_cold, cold = solver.solve(A, b)
    x0 = x_star + 1e-6 * torch.randn(x_star.shape, generator=g)
    x_warm, warm = solver.solve(A, b, x0=x0)
    assert cold.converged and warm.converged and warm.warm == 1 and cold.warm == 0
    assert warm.matvecs < cold.matvecs, (warm.matvecs, cold.matvecs)
    assert torch.allclose(x_warm, x_star, atol=1e-9) and torch.allclose(x_cold, x_star, atol=1e-9)
    assert (A @ x_warm - b).norm() <= warm.tolerance


def test_neumann_from_a_warm_start():
    A, b, x_star, g = _system()
    solver = inn.Neumann(step_size=1.0 / torch.linalg.matrix_norm(A, 2).item(), rtol=1e-10, max_steps=5000)
    _, cold = solver.solve(A, b)
    x, warm = solver.solve(A, b, x0=x_star + 1e-5 * torch.randn(x_star.shape, generator=g))
    assert cold.converged and warm.converged and warm.matvecs < cold.matvecs
    assert torch.allclose(x, x_star, atol=1e-8)


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
def test_the_exact_solution_as_start_costs_one_product(solver):
    A, b, x_star, _ = _system()
    x, info = solver.solve(A, b, x0=x_star)
    # one product for the start's residual, and at most a short Arnoldi run for the error estimate
    assert info.converged and info.steps == 0 and info.matvecs <= 1 + 20 and info.warm == 1
    assert torch.equal(x, x_star)


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
def test_a_start_worse_than_zero_is_discarded(solver):
    A, b, x_star, g = _system(symmetric=not isinstance(solver, inn.CG) or True)
    x_cold, cold = solver.solve(A, b)
    x, info = solver.solve(A, b, x0=100 * torch.randn(x_star.shape, generator=g))
    assert info.converged and info.warm == 0
    assert info.matvecs == cold.matvecs + 1          # the one product that judged the start
    assert torch.allclose(x, x_cold, atol=1e-12)
    x, info = solver.solve(A, b, x0=torch.full_like(b, float("nan")))
    assert info.converged and info.warm == 0 and torch.allclose(x, x_star, atol=1e-9)


def test_groups_judge_their_starts_one_by_one():
    A, b, x_star, g = _system(n=6)
    A2 = torch.block_diag(A, 2 * A)
    b2 = torch.cat([b, b])
    x2 = torch.linalg.solve(A2, b2)
    good, bad = x2[:6] + 1e-7, 50 * torch.randn(6, generator=g)
    x, info = inn.GMRES(rtol=1e-12).solve(A2, b2, groups=2, x0=torch.cat([good, bad]))
    assert info.converged and info.warm == 1
    assert torch.allclose(x, x2, atol=1e-9)


def test_a_start_of_the_wrong_shape_or_dtype_is_refused():
    A, b, _, _ = _system()
    with pytest.raises(ValueError, match="x0 must be a tensor like b"):
        inn.GMRES().solve(A, b, x0=torch.zeros(5))
    with pytest.raises(ValueError, match="x0 must be a tensor like b"):
        inn.GMRES().solve(A, b, x0=torch.zeros(12, dtype=torch.float32))


def test_dense_ignores_the_start():
    A, b, x_star, _ = _system()
    _, cold = inn.Dense().solve(A, b)
    x, info = inn.Dense().solve(A, b, x0=x_star)
    assert info.matvecs == cold.matvecs and info.warm == 0 and torch.allclose(x, x_star, atol=1e-12)


# ----------------------------------------------------------------- the layer
def _game(seed=1, n=40, p=3):
    g = torch.Generator().manual_seed(seed)
    K = torch.randn(n, n, generator=g)
    A = 2 * torch.eye(n) + (K - K.T) / n ** 0.5 + K @ K.T / n   # strongly monotone, not symmetric
    W = torch.randn(n, p, generator=g)
    c = torch.randn(n, generator=g)

    def F(z, th):
        return A @ z + 0.1 * torch.tanh(z) - W @ th

    return F, W, c


def _loss(F, c, th, adjoint):
    z = inn.solve_vi(F, torch.zeros(c.shape[0]), th, solver=inn.PRGD(rtol=1e-13), adjoint=adjoint)
    return z @ c


def test_the_layer_warm_starts_across_calls_with_unchanged_gradients():
    F, W, c = _game()
    ws = inn.WarmStart()
    warm = inn.Implicit(linear_solver=inn.GMRES(rtol=1e-12), warm_start=ws)
    cold = inn.Implicit(linear_solver=inn.GMRES(rtol=1e-12))
    th0 = torch.tensor([0.2, -0.1, 0.4])
    products = {"warm": [], "cold": []}
    for k in range(4):
        th = (th0 + 1e-4 * k).requires_grad_(True)
        grads = {}
        for name, adjoint in (("warm", warm), ("cold", cold)):
            sol = inn.vi_solution(F, torch.zeros(c.shape[0]), th, solver=inn.PRGD(rtol=1e-13), adjoint=adjoint)
            (grads[name],) = torch.autograd.grad(sol.value @ c, th)
            products[name].append(sum(i.matvecs for i in sol.backward))
        assert torch.allclose(grads["warm"], grads["cold"], atol=1e-10, rtol=0)
    assert ws.solves == 4 and ws.warm == 3
    assert all(w < c for w, c in zip(products["warm"][1:], products["cold"][1:])), products
    # the gradient against finite differences of the exact solution
    th = th0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(_loss(F, c, th, warm), th)
    fd = torch.autograd.functional.jacobian(lambda t: _loss(F, c, t, cold), th0)  # implicit, cold: independent
    assert torch.allclose(g, fd, atol=1e-10)


def _plain(ws):
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return all(not wrapped(x) for x in ws._last.values())


def test_warm_start_under_torch_func_and_at_second_order_changes_nothing():
    F, W, c = _game()
    ws = inn.WarmStart()
    warm = inn.Implicit(linear_solver=inn.GMRES(rtol=1e-12), warm_start=ws)
    cold = inn.Implicit(linear_solver=inn.GMRES(rtol=1e-12))
    th = torch.tensor([0.2, -0.1, 0.4])
    g_func = torch.func.grad(lambda t: _loss(F, c, t, warm))(th)
    g_func2 = torch.func.grad(lambda t: _loss(F, c, t, warm))(th)
    assert ws.warm == 1 and _plain(ws)          # one level of grad: the backward runs on plain tensors
    assert torch.allclose(g_func, g_func2, atol=1e-12)
    # nested transforms: the inner solves see wrapped tensors and skip the store
    H_func = torch.func.hessian(lambda t: _loss(F, c, t, warm))(th)
    assert _plain(ws)
    # vmap: the batch is one stacked problem with its own entry in the store
    ths = th + 0.01 * torch.arange(3.0).unsqueeze(1)
    gv = [torch.func.vmap(torch.func.grad(lambda t: _loss(F, c, t, warm)))(ths) for _ in range(2)]
    gv_cold = torch.func.vmap(torch.func.grad(lambda t: _loss(F, c, t, cold)))(ths)
    assert _plain(ws) and torch.allclose(gv[1], gv_cold, atol=1e-10) and torch.allclose(gv[0], gv_cold, atol=1e-10)
    H_warm = torch.autograd.functional.hessian(lambda t: _loss(F, c, t, warm), th)
    H_warm2 = torch.autograd.functional.hessian(lambda t: _loss(F, c, t, warm), th)  # now from warm starts
    H_cold = torch.autograd.functional.hessian(lambda t: _loss(F, c, t, cold), th)
    assert ws.warm > 0
    assert torch.allclose(H_warm, H_cold, atol=1e-9) and torch.allclose(H_warm2, H_cold, atol=1e-9)
    g_cold = torch.func.grad(lambda t: _loss(F, c, t, cold))(th)
    assert torch.allclose(g_func, g_cold, atol=1e-10)
    assert torch.allclose(H_func, H_cold, atol=1e-9)
    # finite differences of the gradient: the Hessian is the derivative of what the layer returns
    h = 1e-5
    rows = []
    for k in range(3):
        e = torch.zeros(3)
        e[k] = h
        gp = torch.func.grad(lambda t: _loss(F, c, t, cold))(th + e)
        gm = torch.func.grad(lambda t: _loss(F, c, t, cold))(th - e)
        rows.append((gp - gm) / (2 * h))
    assert torch.allclose(H_warm2, torch.stack(rows), atol=1e-6)


def test_custom_root_takes_a_warm_start():
    @inn.custom_root(lambda z, th: z ** 3 + z - th, linear_solver=inn.GMRES(rtol=1e-12), warm_start=True)
    def solve(z0, th):
        z = z0.clone()
        for _ in range(60):
            z = z - (z ** 3 + z - th) / (3 * z ** 2 + 1)
        return z

    th = torch.tensor([0.5, 2.0, -1.0], requires_grad=True)
    for _ in range(2):
        z = solve(torch.zeros(3), th)
        (g,) = torch.autograd.grad(z.sum(), th)
        assert torch.allclose(g, 1 / (3 * z.detach() ** 2 + 1), atol=1e-12)


def test_bad_warm_start_values_are_refused():
    with pytest.raises(TypeError, match="warm_start must be a WarmStart"):
        inn.Implicit(warm_start="yes")
    assert inn.Implicit(warm_start=True).warm_start is not None
    assert inn.Implicit().warm_start is None


# ----------------------------------------------------------------- mixed-precision refinement
def _spd(n=60, cond=50.0, seed=3):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    A = (Q * torch.linspace(1, cond, n)) @ Q.T
    return (A + A.T) / 2, torch.randn(n, generator=g)


@pytest.mark.parametrize("inner", [inn.CG(), inn.GMRES(), inn.BiCGSTAB()], ids=lambda s: type(s).__name__)
def test_refinement_meets_the_float64_tolerance_with_float32_products(inner):
    A, b = _spd()
    x_star = torch.linalg.solve(A, b)
    seen = []

    def low(dtype):
        M = A.to(dtype)

        def mv(v):
            seen.append(v.dtype)
            return M @ v
        return inn.LinearOperator(mv, mv, True)

    op = inn.LinearOperator(lambda v: A @ v, lambda v: A @ v, True, lowered=low)
    x, info = inn.Refined(solver=inner, rtol=1e-12).solve(op, b)
    assert info.converged and x.dtype == torch.float64
    assert (A @ x - b).norm() <= info.tolerance
    assert torch.allclose(x, x_star, atol=1e-9)
    assert seen and set(seen) == {torch.float32} and "mixed-precision" in info.message
    assert info.matvecs > len(seen)          # the float64 residual products are counted too


def test_refinement_of_a_dense_matrix_and_per_block():
    A, b = _spd()
    x, info = inn.Refined(solver=inn.CG(), rtol=1e-12).solve(A, b)
    assert info.converged and torch.allclose(x, torch.linalg.solve(A, b), atol=1e-9)
    A2, b2 = torch.block_diag(A, 3 * A), torch.cat([b, 1e-4 * b])   # each block on its own tolerance
    x2, info2 = inn.Refined(rtol=1e-12).solve(A2, b2, groups=2)
    assert info2.converged and torch.allclose(x2, torch.linalg.solve(A2, b2), rtol=1e-8, atol=0)
    # blocks of very different scales share float32 Krylov vectors: right, or a loud failure
    A3 = torch.block_diag(A, 1e3 * A)
    x3, info3 = inn.Refined(rtol=1e-12).solve(A3, b2, groups=2)
    ok = torch.allclose(x3, torch.linalg.solve(A3, b2), rtol=1e-8, atol=0)
    assert info3.converged == ok and (ok or info3.status == "max_steps")


def test_refinement_hands_over_to_float64_when_float32_cannot_resolve_the_system():
    A, b = _spd(cond=1e9)                  # kappa * eps32 >> 1: float32 rounds cannot make progress
    x, info = inn.Refined(solver=inn.GMRES(), rtol=1e-10, max_steps=3000).solve(A, b)
    ref, cold = inn.GMRES(rtol=1e-10, max_steps=3000).solve(A, b)
    assert info.status == cold.status
    if info.converged:
        assert (A @ x - b).norm() <= info.tolerance
    assert "float64" in info.message


def test_refinement_without_a_lower_form_runs_in_the_working_precision():
    A, b = _spd()
    x, info = inn.Refined(rtol=1e-12).solve(lambda v: A @ v, b)
    assert info.converged and "no lower-precision form" in info.message
    assert torch.allclose(x, torch.linalg.solve(A, b), atol=1e-9)


def test_refined_layer_backward_equals_float64_to_the_tolerance():
    _, W, c = _game()
    n = c.shape[0]
    g = torch.Generator().manual_seed(5)
    K = torch.randn(n, n, generator=g)
    M = 2 * torch.eye(n) + (K - K.T) / n ** 0.5 + K @ K.T / n

    def F(z, args):                          # the matrices travel in theta, so they are cast too
        th, M_, W_ = args
        return M_ @ z + 0.1 * torch.tanh(z) - W_ @ th

    def value(t, solver):
        return inn.solve_vi(F, torch.zeros(n), (t, M, W), solver=inn.PRGD(rtol=1e-13),
                            adjoint=inn.Implicit(linear_solver=solver)) @ c

    th = torch.tensor([0.2, -0.1, 0.4], requires_grad=True)
    grads, infos = [], []
    for solver in (inn.GMRES(rtol=1e-12), inn.Refined(rtol=1e-12)):
        sol = inn.vi_solution(F, torch.zeros(n), (th, M, W), solver=inn.PRGD(rtol=1e-13),
                              adjoint=inn.Implicit(linear_solver=solver))
        grads.append(torch.autograd.grad(sol.value @ c, th)[0])
        infos.append(sol.backward[-1])
    assert infos[1].converged and "mixed-precision" in infos[1].message, infos[1].message
    assert torch.allclose(grads[0], grads[1], atol=1e-10, rtol=0)
    # second order: Refined inside LinearSolveFn like any other solver
    H = [torch.autograd.functional.hessian(lambda t: value(t, s), th.detach())
         for s in (inn.GMRES(rtol=1e-12), inn.Refined(rtol=1e-12))]
    assert torch.allclose(H[0], H[1], atol=1e-9)


def test_a_residual_that_keeps_float64_tensors_is_not_lowered():
    A64 = torch.eye(5) * 3

    def F(z, th):
        return A64 @ z - th                  # A64 stays float64: promotion would defeat float32 products

    th = torch.randn(5, requires_grad=True)
    sol = inn.vi_solution(F, torch.zeros(5), th, solver=inn.PRGD(rtol=1e-13),
                          adjoint=inn.Implicit(linear_solver=inn.Refined(rtol=1e-12)))
    (g,) = torch.autograd.grad(sol.value.sum(), th)
    assert torch.allclose(g, torch.full((5,), 1 / 3), atol=1e-12)
    assert "no lower-precision form" in sol.backward[-1].message


def test_bad_refined_settings_are_refused():
    with pytest.raises(TypeError, match="iterative LinearSolver"):
        inn.Refined(solver=inn.Dense())
    with pytest.raises(ValueError, match="floating dtype"):
        inn.Refined(precision=torch.int32)


# ----------------------------------------------------------------- separable residuals
def test_custom_root_with_blocks_solves_each_block_on_its_own():
    g = torch.Generator().manual_seed(7)
    mats = torch.stack([torch.eye(6) * s + 0.3 * torch.randn(6, 6, generator=g) for s in (1.0, 5.0, 40.0, 2.0)])

    def residual(z, th):                      # four independent blocks: z["a"][i], z["b"][i] for block i
        u = torch.cat([z["a"], z["b"]], 1)
        r = torch.einsum("bij,bj->bi", mats, u) + 0.05 * u ** 3 - th
        return {"a": r[:, :2], "b": r[:, 2:]}

    def flat(z):
        return torch.cat([z["a"], z["b"]], 1).reshape(-1)

    def newton(z0, th):
        u = torch.cat([z0["a"], z0["b"]], 1)
        for _ in range(50):
            F = lambda v: flat(residual({"a": v.reshape(4, 6)[:, :2], "b": v.reshape(4, 6)[:, 2:]}, th))
            J = torch.func.jacrev(F)(u.reshape(-1))
            u = (u.reshape(-1) - torch.linalg.solve(J, F(u.reshape(-1)))).reshape(4, 6)
        return {"a": u[:, :2], "b": u[:, 2:]}

    th = torch.randn(4, 6, generator=g, requires_grad=True)
    c = torch.randn(4, 6, generator=g)
    z0 = {"a": torch.zeros(4, 2), "b": torch.zeros(4, 4)}
    out, infos = {}, {}
    for blocks in (1, 4):
        solve = inn.custom_root(residual, linear_solver=inn.GMRES(rtol=1e-12), blocks=blocks)(newton)
        z = solve(z0, th)
        out[blocks] = torch.autograd.grad((flat(z) * c.reshape(-1)).sum(), th)[0]
    z = newton(z0, th.detach())
    F = lambda v: flat(residual({"a": v.reshape(4, 6)[:, :2], "b": v.reshape(4, 6)[:, 2:]}, th.detach()))
    J = torch.func.jacrev(F)(flat(z))
    exact = torch.linalg.solve(J.T, c.reshape(-1)).reshape(4, 6)   # dr/dth = -I: the gradient is J^{-T} c
    assert torch.allclose(out[1], exact, atol=1e-10) and torch.allclose(out[4], exact, atol=1e-10)
    with pytest.raises(ValueError, match="5"):
        inn.custom_root(residual, blocks=5)(newton)(z0, th)
    with pytest.raises(ValueError, match="blocks must be a positive integer"):
        inn.custom_root(residual, blocks=0)
