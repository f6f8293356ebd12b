"""The layer at its edges (issue 12): every finding is a test.  Second derivatives, torch.func
transforms, set parameters, the failure contract, scale-free tolerances, throw=False, the API
contract and custom_root -- each against a closed form, a dense solve, finite differences or
Unrolled, in float64 unless the finding is about float32."""
import warnings

import pytest
import torch

import implicit_nash as inn

TIGHT = inn.PRGD(rtol=1e-13)


# ----------------------------------------------------------------- a problem with a nonlinear theta
def _problem(seed=0, n=3, p=2):
    g = torch.Generator().manual_seed(seed)
    K = torch.randn(n, n, generator=g)
    A = (K - K.T) + 2 * torch.eye(n)           # strongly monotone, non-symmetric
    W = torch.randn(n, p, generator=g)
    c = torch.randn(n, generator=g)
    return A, W, c


A, W, C = _problem()


def F(z, th):
    return A @ z - W @ torch.sin(th)


def z_exact(th):
    return torch.linalg.solve(A, W @ torch.sin(th))


def loss(th, adjoint=None, solver=TIGHT):
    z = inn.solve_vi(F, torch.zeros(3), th, solver=solver, adjoint=adjoint)
    return (z @ C) * (th ** 2).sum()


def loss_exact(th):
    return (z_exact(th) @ C) * (th ** 2).sum()


TH = torch.tensor([0.3, -0.7])


# ----------------------------------------------------------------- 1. higher order
def test_grad_of_grad_equals_unrolled_finite_differences_and_the_closed_form():
    H_exact = torch.autograd.functional.hessian(loss_exact, TH)
    for adjoint in (None, inn.Unrolled()):
        th = TH.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss(th, adjoint), th, create_graph=True)
        H = torch.stack([torch.autograd.grad(g[i], th, retain_graph=True)[0] for i in range(2)])
        assert torch.allclose(H, H_exact, atol=1e-9), (type(adjoint).__name__, H, H_exact)
    # finite differences of the layer's own gradient
    h = 1e-6
    rows = []
    for k in range(2):
        e = torch.zeros(2)
        e[k] = h
        gp = torch.func.grad(loss)(TH + e)
        gm = torch.func.grad(loss)(TH - e)
        rows.append((gp - gm) / (2 * h))
    assert torch.allclose(torch.stack(rows), H_exact, atol=1e-6)


def test_hessian_vector_product_and_autograd_functional_hessian():
    H_exact = torch.autograd.functional.hessian(loss_exact, TH)
    assert torch.allclose(torch.autograd.functional.hessian(loss, TH), H_exact, atol=1e-9)
    v = torch.tensor([0.4, 1.3])
    _, hvp = torch.autograd.functional.hvp(loss, TH, v)
    assert torch.allclose(hvp, H_exact @ v, atol=1e-9)


def test_third_order_is_implicit_too():
    def third(f):
        return torch.func.jacrev(torch.func.jacrev(torch.func.grad(f)))(TH)
    T = third(loss)
    assert torch.allclose(T, third(loss_exact), atol=1e-7)


def test_second_order_through_active_box_constraints():
    """Second derivatives through the projection (piecewise linear: zero curvature) equal Unrolled."""
    box = inn.Box(-0.1, 0.1)

    def f(th, adjoint=None):
        z = inn.solve_vi(F, torch.zeros(3), th, solver=TIGHT, constraint=box, adjoint=adjoint)
        return (z @ C) * (th ** 2).sum() + (z ** 2).sum() * th[0]

    th = torch.tensor([0.9, -1.1])
    z = inn.solve_vi(F, torch.zeros(3), th, solver=TIGHT, constraint=box)
    assert ((z.abs() - 0.1).abs() < 1e-12).any()  # some bound is active
    H = torch.autograd.functional.hessian(f, th)
    H_unrolled = torch.autograd.functional.hessian(
        lambda t: f(t, inn.Unrolled()), th)
    assert torch.allclose(H, H_unrolled, atol=1e-7)


# ----------------------------------------------------------------- 2. torch.func
def test_torch_func_transforms_equal_the_closed_form():
    J_exact = torch.func.jacrev(z_exact)(TH)
    solve = lambda t: inn.solve_vi(F, torch.zeros(3), t, solver=TIGHT)
    assert torch.allclose(torch.func.jacrev(solve)(TH), J_exact, atol=1e-10)
    assert torch.allclose(torch.func.jacfwd(solve)(TH), J_exact, atol=1e-10)
    assert torch.allclose(torch.func.grad(loss)(TH), torch.func.grad(loss_exact)(TH), atol=1e-10)
    out, pullback = torch.func.vjp(solve, TH)
    assert torch.allclose(pullback(C)[0], J_exact.T @ C, atol=1e-10)
    _, tangent = torch.func.jvp(solve, (TH,), (torch.tensor([1.0, 2.0]),))
    assert torch.allclose(tangent, J_exact @ torch.tensor([1.0, 2.0]), atol=1e-10)
    assert torch.allclose(torch.func.hessian(loss)(TH), torch.func.hessian(loss_exact)(TH), atol=1e-8)


def test_vmap_solves_the_batch_together_and_equals_a_loop():
    thetas = torch.randn(5, 2, generator=torch.Generator().manual_seed(3)) * torch.tensor([[1.0], [10.0], [0.1], [1.0], [3.0]])
    solve = lambda t: inn.solve_vi(F, torch.zeros(3), t, solver=TIGHT)
    batched = torch.func.vmap(solve)(thetas)
    loop = torch.stack([solve(t) for t in thetas])
    assert torch.allclose(batched, loop, atol=1e-10)
    # the per-problem gradient under vmap, and the per-problem jacobian
    grads = torch.func.vmap(torch.func.grad(loss))(thetas)
    assert torch.allclose(grads, torch.stack([torch.func.grad(loss_exact)(t) for t in thetas]), atol=1e-8)
    jac = torch.func.vmap(torch.func.jacrev(solve))(thetas)
    assert torch.allclose(jac, torch.stack([torch.func.jacrev(z_exact)(t) for t in thetas]), atol=1e-9)
    # autograd through a vmapped solve, and a batch of initial points with one theta
    th = thetas.clone().requires_grad_(True)
    torch.func.vmap(solve)(th).sum().backward()
    ref = torch.stack([torch.func.vjp(z_exact, t)[1](torch.ones(3))[0] for t in thetas])
    assert torch.allclose(th.grad, ref, atol=1e-9)
    starts = torch.randn(4, 3)
    same = torch.func.vmap(lambda z0: inn.solve_vi(F, z0, TH, solver=TIGHT))(starts)
    assert torch.allclose(same, z_exact(TH).expand(4, 3), atol=1e-10)


def test_vmap_reports_per_problem_status():
    sols = []

    def solve(t):
        sol = inn.vi_solution(lambda z, th: th * z - 1.0, torch.zeros(2), t,
                              solver=inn.PRGD(max_steps=2000), throw=False)
        sols.append(sol)
        return sol.value

    # the third problem is not monotone (theta < 0): it diverges while the others converge
    with pytest.warns(inn.ConvergenceWarning, match=r"member 2 of the vmapped batch"):
        torch.func.vmap(solve)(torch.tensor([1.0, 2.0, -1.0]))
    assert sols[0].statuses[:2] == ["converged", "converged"] and sols[0].statuses[2] != "converged"


def test_unrolled_refuses_vmap_with_a_clear_message():
    with pytest.raises(ValueError, match="Unrolled.*vmap"):
        torch.func.vmap(lambda t: inn.solve_vi(F, torch.zeros(3), t, adjoint=inn.Unrolled()))(torch.randn(2, 2))


# ----------------------------------------------------------------- 3. set parameters get gradients
def test_box_bound_that_requires_grad_gets_its_gradient():
    ub = torch.tensor(0.05, requires_grad=True)
    th = torch.tensor([1.0, 0.5])
    grads = {}
    for name, adjoint in (("implicit", None), ("unrolled", inn.Unrolled())):
        ub.grad = None
        z = inn.solve_vi(F, torch.zeros(3), th, solver=TIGHT, constraint=inn.Box(-10.0, ub), adjoint=adjoint)
        (z @ C).backward()
        grads[name] = ub.grad.clone()
    assert grads["implicit"] is not None
    # finite differences of the solution in the bound
    h = 1e-6
    f = lambda u: inn.solve_vi(F, torch.zeros(3), th, solver=TIGHT, constraint=inn.Box(-10.0, u)) @ C
    fd = (f(torch.tensor(0.05 + h)) - f(torch.tensor(0.05 - h))) / (2 * h)
    assert abs(grads["implicit"] - fd) < 1e-6 and abs(fd) > 1e-3
    assert abs(grads["implicit"] - grads["unrolled"]) < 1e-6


def test_ball_centre_and_radius_and_simplex_total_get_gradients():
    th = torch.tensor([1.0, 0.5])
    centre = torch.tensor([0.1, 0.0, -0.2], requires_grad=True)
    radius = torch.tensor(0.05, requires_grad=True)

    def obj(cn, r):
        z = inn.solve_vi(F, torch.zeros(3), th, solver=TIGHT, constraint=inn.Ball(r, cn))
        return z @ C

    obj(centre, radius).backward()
    h = 1e-6
    for k in range(3):
        e = torch.zeros(3)
        e[k] = h
        fd = (obj(centre.detach() + e, radius.detach()) - obj(centre.detach() - e, radius.detach())) / (2 * h)
        assert abs(centre.grad[k] - fd) < 1e-6
    fd = (obj(centre.detach(), radius.detach() + h) - obj(centre.detach(), radius.detach() - h)) / (2 * h)
    assert abs(radius.grad - fd) < 1e-6 and abs(fd) > 1e-3

    total = torch.tensor(2.0, requires_grad=True)
    phi = inn.nash_equilibrium(lambda p, t: ((p - t) ** 2).sum(1) * 0.5, torch.full((2, 3), 0.5),
                               torch.tensor([0.9, 1.0, 0.8]), constraint=inn.Simplex(total), solver=TIGHT)
    phi[:, 0].sum().backward()
    # each player's equilibrium is the projection of t onto {x >= 0, sum x = total}; all three
    # entries stay positive, so d(phi_i0)/d(total) = 1/3 for each of the two players
    assert abs(total.grad - 2 / 3) < 1e-8


# ----------------------------------------------------------------- 4. one failure contract
def _bilinear(z, th):  # f1 = p1 p2 - th1 p1, f2 = -p1 p2 + th2 p2: a skew-symmetric P
    return torch.stack([z[1] - th[0], -z[0] + th[1]])


def test_bicgstab_on_a_bilinear_game_raises_convergence_error_breakdown():
    th = torch.tensor([1.0, 2.0], requires_grad=True)
    z = inn.solve_vi(_bilinear, torch.zeros(2), th, solver=inn.PRGD(rtol=1e-12),
                     adjoint=inn.Implicit(linear_solver=inn.BiCGSTAB()))
    assert torch.allclose(z, torch.tensor([2.0, 1.0]), atol=1e-9)
    with pytest.raises(inn.ConvergenceError) as err:
        z.sum().backward()
    assert err.value.status == "breakdown" and err.value.stage == "backward"
    th.grad = None
    z = inn.solve_vi(_bilinear, torch.zeros(2), th, solver=inn.PRGD(rtol=1e-12))  # GMRES is fine
    z.sum().backward()
    assert torch.allclose(th.grad, torch.tensor([1.0, 1.0]))


def _singular(z, th):  # P = [[1, 1], [1, 1]] is singular; PRGD still finds a solution of F = 0
    return torch.stack([z[0] + z[1] - th[0], z[0] + z[1] - th[0]]) + 0 * th[1]


@pytest.mark.parametrize("linear_solver", [inn.Dense(), inn.GMRES()])
def test_singular_jacobian_raises_singular_or_a_failure_status(linear_solver):
    th = torch.tensor([1.0, 2.0], requires_grad=True)
    z = inn.solve_vi(_singular, torch.zeros(2), th, solver=inn.PRGD(rtol=1e-12),
                     adjoint=inn.Implicit(linear_solver=linear_solver))
    with pytest.raises(inn.ConvergenceError) as err:
        (z * torch.tensor([1.0, 0.0])).sum().backward()
    assert err.value.status in ("singular", "breakdown", "max_steps")
    assert not isinstance(err.value, (ZeroDivisionError, IndexError))


def test_simplex_on_non_finite_input_is_not_an_index_error():
    out = inn.Simplex().project(torch.tensor([[float("nan"), 1.0, 0.0]]), 1)
    assert out.shape == (1, 3)
    assert torch.isnan(out).all()
    out = inn.Simplex().project(torch.tensor([float("inf"), 1.0, 0.0]))
    assert out.shape == (3,)
    # an operator that turns NaN inside the simplex mid-solve: a ConvergenceError, not an IndexError
    with pytest.raises(inn.ConvergenceError) as err:
        inn.solve_vi(lambda z, t: z * t + torch.where(z < 0.2, float("nan"), 0.0), torch.full((3,), 1 / 3),
                     torch.tensor([1.0, 2.0, 30.0]), constraint=inn.Simplex())
    assert err.value.status == "diverged"


# ----------------------------------------------------------------- 5. the forward tolerance is scale-free
def test_forward_tolerance_gives_the_same_accuracy_whatever_the_scale_of_F():
    """float32, z0 = 10 * ones: the old rule (atol + rtol max(r0, ||z||)) stopped at relative error
    0.235 when F was scaled by 1e-4; now the error does not depend on the scale."""
    Af, Wf = A.float(), W.float()
    exact = torch.linalg.solve(A, W @ torch.sin(TH))
    g_exact = torch.func.grad(lambda t: z_exact(t) @ C)(TH)
    errors, grad_errors = [], []
    for scale in (1e-4, 1.0, 1e4):
        th = TH.float().requires_grad_(True)
        op = lambda z, t: scale * (Af @ z - Wf @ torch.sin(t))
        sol = inn.vi_solution(op, torch.full((3,), 10.0, dtype=torch.float32), th)
        assert sol.status == "converged"
        errors.append(float(torch.linalg.norm(sol.value.detach().double() - exact) / torch.linalg.norm(exact)))
        (g,) = torch.autograd.grad(sol.value @ C.float(), th)
        grad_errors.append(float(torch.linalg.norm(g.double() - g_exact) / torch.linalg.norm(g_exact)))
    assert max(errors) < 1e-2 and max(errors) <= 1.5 * min(errors), errors
    assert max(grad_errors) < 1e-2, grad_errors


# ----------------------------------------------------------------- 7. throw=False never hands back garbage
def test_throw_false_with_a_singular_jacobian_returns_a_zero_gradient_and_warns():
    th = torch.tensor([1.0, 2.0], requires_grad=True)
    z = inn.solve_vi(_singular, torch.zeros(2), th, solver=inn.PRGD(rtol=1e-12), throw=False)
    with pytest.warns(inn.ConvergenceWarning, match="set to zero"):
        (z * torch.tensor([1.0, 0.0])).sum().backward()
    assert torch.equal(th.grad, torch.zeros(2))


# ----------------------------------------------------------------- 8. zero tolerances
def test_rtol_zero_is_accepted_as_a_pure_absolute_tolerance():
    z = inn.solve_vi(lambda z, t: 2 * z - t, torch.zeros(2), torch.ones(2), solver=inn.PRGD(rtol=0.0, atol=1e-12))
    assert torch.allclose(z, torch.full((2,), 0.5), atol=1e-11)
    inn.GMRES(rtol=0.0, atol=1e-12)
    with pytest.raises(ValueError, match="rtol"):
        inn.PRGD(rtol=-1e-3)


# ----------------------------------------------------------------- 9. the API contract
def test_solution_carries_this_calls_backward_diagnostics():
    th = TH.clone().requires_grad_(True)
    sol = inn.vi_solution(F, torch.zeros(3), th, solver=TIGHT)
    assert sol.status == "converged" and sol.backward == [] and sol.history
    (sol.value @ C).backward()
    assert len(sol.backward) == 1 and sol.backward[0].converged
    other = inn.vi_solution(F, torch.zeros(3), th, solver=TIGHT)
    (g,) = torch.autograd.grad(other.value @ C, th, create_graph=True)
    g.sum().backward()
    assert len(sol.backward) == 1 and len(other.backward) >= 2  # higher order adds its own solves


def test_symmetry_is_declared_once_and_a_contradiction_is_an_error():
    game = inn.AggregativeGame(local=lambda p, th: (p ** 2).sum(), symmetric=False)
    with pytest.warns(DeprecationWarning, match="symmetric"):
        adjoint = inn.Implicit(linear_solver=inn.CG(), symmetric=True)
    with pytest.raises(ValueError, match="contradicts"):
        inn.nash_equilibrium(game, torch.zeros(2, 1), torch.zeros(()).requires_grad_(), adjoint=adjoint)
    # a symmetric declaration reaches CG, which then trusts it (no test products)
    sym = inn.AggregativeGame(local=lambda p, th: ((p - th) ** 2).sum(), symmetric=True)
    th = torch.tensor(1.0, requires_grad=True)
    sol = inn.nash_solution(sym, torch.zeros(3, 1), th, adjoint=inn.Implicit(linear_solver=inn.CG()))
    sol.value.sum().backward()
    assert sol.backward[0].matvecs <= sol.backward[0].steps + 2 and torch.allclose(th.grad, torch.tensor(3.0))


def test_options_that_would_be_ignored_are_refused():
    with pytest.raises(ValueError, match="ratio and growth"):
        inn.PRGD(step_size=0.1, ratio=0.3)
    with pytest.raises(ValueError, match="max_steps"):
        inn.Dense(max_steps=5)
    for cls, rule in ((inn.SimultaneousGradient, "2 mu / L"), (inn.Extragradient, "1 / L"), (inn.GaussSeidel, "2 mu")):
        with pytest.raises(ValueError, match=rf"needs step_size.*{rule}.*PRGD"):
            cls()


def test_return_info_is_deprecated_but_still_works():
    with pytest.warns(DeprecationWarning, match="vi_solution"):
        sol = inn.solve_vi(lambda z, t: z - t, torch.zeros(2), torch.ones(2), return_info=True)
    assert isinstance(sol, inn.Solution)


def test_nash_equilibrium_does_not_evaluate_the_costs_for_validation():
    calls = []

    def costs(phi, th):
        calls.append(1)
        return 0.5 * ((phi - th) ** 2).sum(1)

    inn.nash_equilibrium(costs, torch.zeros(3, 2), torch.ones(2), solver=inn.PRGD(step_size=0.3, max_steps=200))
    evaluations = len(calls)
    inn.nash_equilibrium(costs, torch.zeros(3, 2), torch.ones(2), solver=inn.PRGD(step_size=0.3, max_steps=200))
    # every evaluation of the costs is one evaluation of the pseudo-gradient by the solver
    assert len(calls) == 2 * evaluations
    with pytest.raises(ValueError, match=r"shape \(B,\) = \(3,\)"):
        inn.nash_equilibrium(lambda p, t: costs(p, t)[:2], torch.zeros(3, 2), torch.ones(2))


# ----------------------------------------------------------------- 10. custom_root / custom_fixed_point
def test_custom_root_with_scipy_forward_matches_the_closed_form_to_second_order():
    scipy_optimize = pytest.importorskip("scipy.optimize")

    def residual(z, th):
        return A @ z - W @ torch.sin(th)

    @inn.custom_root(residual)
    def solve(z0, th):
        out = scipy_optimize.root(lambda x: residual(torch.as_tensor(x), th).numpy(), z0.numpy(), tol=1e-14)
        return torch.as_tensor(out.x)

    f = lambda t: (solve(torch.zeros(3), t) @ C) * (t ** 2).sum()
    assert torch.allclose(torch.func.grad(f)(TH), torch.func.grad(loss_exact)(TH), atol=1e-10)
    assert torch.allclose(torch.autograd.functional.hessian(f, TH), torch.func.hessian(loss_exact)(TH), atol=1e-8)
    # vmap runs the black box once per problem
    thetas = torch.randn(3, 2)
    assert torch.allclose(torch.func.vmap(lambda t: solve(torch.zeros(3), t))(thetas),
                          torch.stack([z_exact(t) for t in thetas]), atol=1e-10)


def test_custom_root_refuses_a_point_that_is_not_a_root():
    @inn.custom_root(lambda z, th: z - th)
    def wrong(z0, th):
        return th + 0.1

    with pytest.raises(inn.ConvergenceError) as err:
        wrong(torch.zeros(2), torch.ones(2))
    assert err.value.status == "not_a_root"


def test_custom_fixed_point_gradient():
    T = lambda z, th: 0.5 * torch.tanh(z) + th

    @inn.custom_fixed_point(T)
    def fp(z0, th):
        z = z0
        for _ in range(300):
            z = T(z, th)
        return z

    th = torch.tensor([0.3, -1.0], requires_grad=True)
    z = fp(torch.zeros(2), th)
    (g,) = torch.autograd.grad(z.sum(), th)
    assert torch.allclose(g, 1 / (1 - 0.5 * (1 - torch.tanh(z.detach()) ** 2)))


def test_pytree_theta_with_integer_data_under_every_mode():
    Am = torch.tensor([[2.0, 1.0], [-1.0, 2.0]])
    op = lambda z, t: Am @ z - t["b"] * t["k"]
    solve = lambda b: inn.solve_vi(op, torch.zeros(2), {"b": b, "k": torch.tensor(2)})
    J = 2 * torch.linalg.inv(Am)
    assert torch.allclose(torch.func.jacrev(solve)(torch.ones(2)), J)
    assert torch.allclose(torch.func.jacfwd(solve)(torch.ones(2)), J)
    assert torch.allclose(torch.func.vmap(solve)(torch.eye(2)), (J @ torch.eye(2)).T)
    b = torch.ones(2, requires_grad=True)
    (g,) = torch.autograd.grad(solve(b).sum(), b, create_graph=True)
    assert torch.allclose(g, J.T @ torch.ones(2))


def test_tensors_the_adjoint_cannot_see_are_refused():
    class Hidden(inn.StrategySet):
        def __init__(self, bounds):
            self.bounds = [bounds]  # inside a list: not found by the default parameters()

        def project(self, x, batch_dims=0):
            return torch.clamp(x, max=self.bounds[0])

    ub = torch.tensor(0.1, requires_grad=True)
    with pytest.raises(ValueError, match="parameters"):
        inn.solve_vi(F, torch.zeros(3), torch.ones(2), constraint=Hidden(ub))
    w = torch.tensor(2.0, requires_grad=True)
    with pytest.raises(ValueError, match="closure"):
        inn.custom_root(lambda z, th: w * z - th)(lambda z0, th: th / 2)(torch.zeros(2), torch.ones(2))
    with pytest.raises(ValueError, match="closure"):
        inn.solve_vi(lambda z, th: w * z - th, torch.zeros(2), torch.ones(2))


def test_custom_root_check_can_be_waived_explicitly():
    @inn.custom_root(lambda z, th: z - th, check=False)
    def vouched(z0, th):
        return th.clone()

    th = torch.ones(2, requires_grad=True)
    vouched(torch.zeros(2), th).sum().backward()
    assert torch.allclose(th.grad, torch.ones(2))


def test_vmap_over_set_parameters_and_nash_layer_under_vmap():
    Am = torch.tensor([[2.0, 1.0], [-1.0, 2.0]])
    f = lambda ub: inn.solve_vi(lambda z, t: Am @ z - t, torch.zeros(2), torch.tensor([3.0, 1.0]),
                                constraint=inn.Box(-1.0, ub))
    ubs = torch.tensor([0.1, 0.5, 5.0])
    assert torch.allclose(torch.func.vmap(f)(ubs), torch.stack([f(u) for u in ubs]))
    J = torch.func.vmap(torch.func.jacrev(f))(ubs)
    assert torch.allclose(J, torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]), atol=1e-9)

    class Costs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(1.5))

        def forward(self, phi, th):
            return 0.5 * self.w * ((phi - th) ** 2).sum(1) + 0.1 * phi.sum(1) * phi.sum()

    layer = inn.NashLayer(Costs())
    thetas = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    out = torch.func.vmap(lambda th: layer(torch.zeros(3, 2), th))(thetas)
    assert torch.allclose(out, torch.stack([layer(torch.zeros(3, 2), th) for th in thetas]), atol=1e-9)


def test_a_first_order_backward_evaluates_the_residual_with_its_graph_once():
    """The backward's linear solve and its product with dG/dtheta share one graph of the residual
    (one evaluation, not two), with the same gradient: the dense -(dr/dz)^-T (dr/dtheta)^T v,
    also for a ball set (G = z - proj(z - F)) and a theta entry that needs no gradient."""
    g = torch.Generator().manual_seed(3)
    n = 5
    M = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = M @ M.T / n + torch.eye(n, dtype=torch.float64)
    Bm = torch.randn(n, 3, generator=g, dtype=torch.float64)
    calls = []

    def residual(z, th):
        calls.append(torch.is_grad_enabled())
        return A @ z + 0.1 * z ** 3 - Bm @ th["w"] * th["s"]

    def forward(z0, th):
        z = z0.clone()
        for _ in range(50):  # Newton on the root
            J = A + torch.diag(0.3 * z ** 2)
            z = z - torch.linalg.solve(J, residual(z, th))
        return z

    w = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(1.5, dtype=torch.float64)  # data: no gradient asked
    v = torch.randn(n, generator=g, dtype=torch.float64)
    for solver in (inn.CG(rtol=1e-12), inn.GMRES(rtol=1e-12)):
        solve = inn.custom_root(residual, linear_solver=solver, symmetric=True, check=False)(forward)
        z = solve(torch.zeros(n, dtype=torch.float64), {"w": w, "s": s})
        calls.clear()
        (gw,) = torch.autograd.grad((v * z).sum(), w)
        assert calls.count(True) == 1, calls
        J = A + torch.diag(0.3 * z.detach() ** 2)
        expected = (Bm * s).T @ torch.linalg.solve(J.T, v)
        torch.testing.assert_close(gw, expected, rtol=1e-9, atol=1e-12)
    # second order still differentiates through the same backward (no shared graph there)
    solve = inn.custom_root(residual, linear_solver=inn.GMRES(rtol=1e-12), symmetric=True, check=False)(forward)
    w2 = w.detach().clone().requires_grad_(True)

    def f(x):
        return (v * solve(torch.zeros(n, dtype=torch.float64), {"w": x, "s": s})).sum()
    (gw,) = torch.autograd.grad(f(w2), w2, create_graph=True)
    (hw,) = torch.autograd.grad(gw.sum(), w2)
    eps = 1e-6
    e = torch.zeros(3, dtype=torch.float64)
    fd = []
    for i in range(3):
        e.zero_()
        e[i] = eps
        xp = (w.detach() + e).requires_grad_(True)
        xm = (w.detach() - e).requires_grad_(True)
        fd.append((torch.autograd.grad(f(xp), xp)[0].sum() - torch.autograd.grad(f(xm), xm)[0].sum()) / (2 * eps))
    torch.testing.assert_close(hw, torch.stack(fd), rtol=1e-5, atol=1e-7)


def test_a_first_order_backward_through_a_ball_set_shares_the_graph_too():
    """A set with parameters: G = z - proj(z - F); the radius and the game's parameter both get
    their gradients from the one graph, equal to finite differences."""
    g = torch.Generator().manual_seed(4)
    n = 4
    M = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = M @ M.T / n + torch.eye(n, dtype=torch.float64)
    target = 3.0 * torch.randn(n, generator=g, dtype=torch.float64)
    calls = []

    def F(z, th):
        calls.append(torch.is_grad_enabled())
        return A @ z - th

    def value(th, r):
        return inn.solve_vi(F, torch.zeros(n, dtype=torch.float64), th, constraint=inn.Ball(radius=r),
                            solver=inn.PRGD(rtol=1e-13)).square().sum()

    th = target.clone().requires_grad_(True)
    r = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    out = value(th, r)
    calls.clear()
    gth, gr = torch.autograd.grad(out, (th, r))
    assert calls.count(True) == 1, calls
    eps = 1e-6
    with torch.no_grad():
        fd_r = (value(th, r + eps) - value(th, r - eps)) / (2 * eps)
        e = torch.zeros(n, dtype=torch.float64)
        e[0] = eps
        fd_t = (value(th + e, r) - value(th - e, r)) / (2 * eps)
    torch.testing.assert_close(gr, fd_r, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(gth[0], fd_t, rtol=1e-5, atol=1e-8)
