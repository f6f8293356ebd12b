"""Equilibria and their derivatives against closed forms, dense implicit solves, finite
differences, unrolled gradients and gradcheck."""
import math

import pytest
import torch

import implicit_nash as inn
from zoo import matrix_game_2x2, matrix_game_2x2_solution, quadratic_game

TIGHT = inn.PRGD(rtol=1e-13)


def jacobian_of_equilibrium(costs, phi0, theta, **kwargs):
    return torch.autograd.functional.jacobian(
        lambda t: inn.nash_equilibrium(costs, phi0, t, **kwargs), theta)


def dense_implicit_jacobian(game_operator, phi, theta):
    """-P^{-1} Q from jacrev and a dense solve (Lemma B.4), independent of the layer's backward."""
    n, p = phi.numel(), theta.numel()
    P = torch.func.jacrev(game_operator, argnums=0)(phi, theta).reshape(n, n)
    Q = torch.func.jacrev(game_operator, argnums=1)(phi, theta).reshape(n, p)
    return -torch.linalg.solve(P, Q).reshape(*phi.shape, p)


@pytest.mark.parametrize("cond", [10.0, 100.0])
@pytest.mark.parametrize("coupling", [0.0, 1.0])
def test_quadratic_zoo_equilibrium_and_jacobian(cond, coupling, gen):
    game = quadratic_game(B=4, d=3, p=2, cond=cond, coupling=coupling, gen=gen)
    assert game.symmetric == (coupling == 0.0)
    theta = torch.randn(2, generator=gen)
    phi0 = torch.zeros(4, 3)
    phi = inn.nash_equilibrium(game.costs, phi0, theta, solver=TIGHT)
    exact = game.solution(theta)
    assert torch.linalg.norm(phi - exact) <= 1e-10 * torch.linalg.norm(exact)

    J = jacobian_of_equilibrium(game.costs, phi0, theta, solver=TIGHT)
    J_closed = game.jacobian()
    J_dense = dense_implicit_jacobian(inn.CostGame(game.costs).pseudo_gradient, exact, theta)
    assert torch.linalg.norm(J_dense - J_closed) <= 1e-10 * torch.linalg.norm(J_closed)
    assert torch.linalg.norm(J - J_closed) <= 1e-8 * torch.linalg.norm(J_closed)


def test_finite_differences(gen):
    game = quadratic_game(B=3, d=2, p=3, cond=30.0, coupling=1.0, gen=gen)
    theta = torch.randn(3, generator=gen)
    phi0 = torch.zeros(3, 2)
    J = jacobian_of_equilibrium(game.costs, phi0, theta, solver=TIGHT)
    h = 1e-5
    for k in range(3):
        e = torch.zeros(3)
        e[k] = h
        plus = inn.nash_equilibrium(game.costs, phi0, theta + e, solver=TIGHT)
        minus = inn.nash_equilibrium(game.costs, phi0, theta - e, solver=TIGHT)
        fd = (plus - minus) / (2 * h)
        assert torch.linalg.norm(fd - J[..., k]) <= 1e-6 * torch.linalg.norm(J[..., k])


def test_gradcheck_tiny_game(gen):
    game = quadratic_game(B=2, d=1, p=2, cond=5.0, coupling=1.0, gen=gen)
    theta = torch.randn(2, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t: inn.nash_equilibrium(game.costs, torch.zeros(2, 1), t, solver=TIGHT), (theta,),
        eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("linear_solver", [
    inn.GMRES(rtol=1e-12), inn.GMRES(restart=3, rtol=1e-12), inn.BiCGSTAB(rtol=1e-12),
    inn.NormalCG(rtol=1e-12), inn.Dense(), inn.Neumann(step_size=0.005, rtol=1e-12, max_steps=100000),
], ids=lambda s: repr(s).split("(")[0] + ("-restart3" if getattr(s, "restart", 50) == 3 else ""))
def test_every_linear_solver_in_backward(linear_solver, gen):
    game = quadratic_game(B=3, d=2, p=2, cond=20.0, coupling=1.0, gen=gen)
    theta = torch.randn(2, generator=gen, requires_grad=True)
    phi = inn.nash_equilibrium(game.costs, torch.zeros(3, 2), theta, solver=TIGHT,
                               adjoint=inn.Implicit(linear_solver=linear_solver))
    w = torch.randn(3, 2, generator=gen)
    (g,) = torch.autograd.grad((phi * w).sum(), theta)
    expected = torch.einsum("bd,bdp->p", w, game.jacobian())
    assert torch.linalg.norm(g - expected) <= 1e-8 * torch.linalg.norm(expected)


def test_cg_backward_on_potential_game_and_gmres_otherwise(gen):
    potential = quadratic_game(B=3, d=2, p=2, cond=20.0, coupling=0.0, gen=gen)
    theta = torch.randn(2, generator=gen, requires_grad=True)
    cg = inn.Implicit(linear_solver=inn.CG(rtol=1e-12))
    phi = inn.nash_equilibrium(potential.costs, torch.zeros(3, 2), theta, solver=TIGHT, adjoint=cg)
    (g,) = torch.autograd.grad(phi.sum(), theta)
    expected = potential.jacobian().sum((0, 1))
    assert torch.linalg.norm(g - expected) <= 1e-8 * torch.linalg.norm(expected)

    # a game that is not a potential game: CG hands the system to GMRES and says so
    general = quadratic_game(B=3, d=2, p=2, cond=20.0, coupling=1.0, gen=gen)
    sol = inn.nash_solution(general.costs, torch.zeros(3, 2), theta, solver=TIGHT, adjoint=cg)
    (g,) = torch.autograd.grad(sol.value.sum(), theta)
    expected = general.jacobian().sum((0, 1))
    assert torch.linalg.norm(g - expected) <= 1e-8 * torch.linalg.norm(expected)
    assert "ran GMRES: the operator is not symmetric" in sol.backward[0].message, sol.backward[0].message
    x, info = inn.CG().solve(inn.LinearOperator(lambda v: v, symmetric=False), torch.ones(3))
    assert info.converged and "ran GMRES: the operator is declared non-symmetric" in info.message


def test_implicit_equals_unrolled_on_long_contraction(gen):
    game = quadratic_game(B=3, d=2, p=2, cond=5.0, coupling=0.5, gen=gen)
    theta = torch.randn(2, generator=gen, requires_grad=True)
    step = game.mu / game.L ** 2
    solver = inn.SimultaneousGradient(step_size=step, num_steps=3000)
    w = torch.randn(3, 2, generator=gen)
    phi_u = inn.nash_equilibrium(game.costs, torch.zeros(3, 2), theta, solver=solver, adjoint=inn.Unrolled())
    phi_i = inn.nash_equilibrium(game.costs, torch.zeros(3, 2), theta, solver=solver)
    (gu,) = torch.autograd.grad((phi_u * w).sum(), theta)
    (gi,) = torch.autograd.grad((phi_i * w).sum(), theta)
    assert torch.linalg.norm(gu - gi) <= 1e-8 * torch.linalg.norm(gi)
    # and a short unrolled run differs: the test can tell the two apart
    short = inn.SimultaneousGradient(step_size=step, num_steps=5)
    phi_s = inn.nash_equilibrium(game.costs, torch.zeros(3, 2), theta, solver=short, adjoint=inn.Unrolled())
    (gs,) = torch.autograd.grad((phi_s * w).sum(), theta)
    assert torch.linalg.norm(gs - gi) > 1e-3 * torch.linalg.norm(gi)


def test_box_constrained_game_with_active_constraints(gen):
    game = quadratic_game(B=3, d=3, p=2, cond=10.0, coupling=1.0, gen=gen)
    theta = torch.randn(2, generator=gen)
    box = inn.Box(-0.3, 0.3)
    phi0 = torch.zeros(3, 3)
    phi = inn.nash_equilibrium(game.costs, phi0, theta, solver=TIGHT, constraint=box)
    x = phi.reshape(-1)
    F = game.A @ x + game.C @ theta + game.b
    active = (x.abs() > 0.3 - 1e-9)
    free = ~active
    assert 0 < int(active.sum()) < x.numel(), "the test needs both active and free coordinates"
    # KKT: free coordinates have zero gradient; active ones push outwards (strict complementarity)
    assert F[free].abs().max() < 1e-9
    assert (F[active] * torch.sign(x[active]) < -1e-6).all()
    # reference: on the free set A_FF dphi_F = -C_F; active coordinates stay at the bound
    J_ref = torch.zeros(x.numel(), 2)
    J_ref[free] = -torch.linalg.solve(game.A[free][:, free], game.C[free])
    J = jacobian_of_equilibrium(game.costs, phi0, theta, solver=TIGHT, constraint=box).reshape(-1, 2)
    assert torch.linalg.norm(J - J_ref) <= 1e-8 * torch.linalg.norm(J_ref)
    h = 1e-6
    e = torch.tensor([h, 0.0])
    fd = (inn.nash_equilibrium(game.costs, phi0, theta + e, solver=TIGHT, constraint=box)
          - inn.nash_equilibrium(game.costs, phi0, theta - e, solver=TIGHT, constraint=box)) / (2 * h)
    assert torch.linalg.norm(fd.reshape(-1) - J[:, 0]) <= 1e-6 * torch.linalg.norm(J[:, 0])


def test_matrix_game_on_simplices(gen):
    theta = torch.tensor([3.0, -1.0, -2.0, 1.0], requires_grad=True)  # no saddle point
    costs = matrix_game_2x2(theta)
    phi0 = torch.full((2, 2), 0.5)
    phi = inn.nash_equilibrium(costs, phi0, theta, solver=TIGHT, constraint=inn.Simplex())
    exact = matrix_game_2x2_solution(theta)
    assert torch.allclose(phi, exact.detach(), atol=1e-10)
    J = torch.autograd.functional.jacobian(
        lambda t: inn.nash_equilibrium(costs, phi0, t, solver=TIGHT, constraint=inn.Simplex()), theta.detach())
    J_ref = torch.autograd.functional.jacobian(matrix_game_2x2_solution, theta.detach())
    assert torch.linalg.norm(J - J_ref) <= 1e-8 * torch.linalg.norm(J_ref)


def test_simplex_with_active_constraint():
    # A strongly monotone game on the 3-simplex whose equilibrium has a zero entry.
    def costs(phi, th):
        target = torch.stack([th[0], th[1], torch.tensor(-1.0)])
        return 0.5 * ((phi - target) ** 2).sum(1) + 0.1 * (phi[0] * phi[1]).sum() * torch.tensor([1.0, -1.0])

    theta = torch.tensor([0.7, 0.5])
    phi0 = torch.full((2, 3), 1 / 3)
    phi = inn.nash_equilibrium(costs, phi0, theta, solver=TIGHT, constraint=inn.Simplex())
    assert (phi[:, 2] == 0).all() and (phi[:, :2] > 0.1).all()
    J = torch.autograd.functional.jacobian(
        lambda t: inn.nash_equilibrium(costs, phi0, t, solver=TIGHT, constraint=inn.Simplex()), theta)
    h = 1e-6
    for k in range(2):
        e = torch.zeros(2)
        e[k] = h
        fd = (inn.nash_equilibrium(costs, phi0, theta + e, solver=TIGHT, constraint=inn.Simplex())
              - inn.nash_equilibrium(costs, phi0, theta - e, solver=TIGHT, constraint=inn.Simplex())) / (2 * h)
        assert torch.linalg.norm(fd - J[..., k]) <= 1e-6 * max(1.0, float(torch.linalg.norm(J[..., k])))
    assert torch.all(J[:, 2] == 0)


def test_ball_constraint_derivative():
    # One player, f = |phi - theta|^2/2 on the unit ball: phi* = theta/|theta| outside the ball.
    theta = torch.tensor([[1.5, 2.0]])
    phi = lambda t: inn.nash_equilibrium(lambda p, th: 0.5 * ((p - th) ** 2).sum(1), torch.zeros(1, 2), t,
                                         solver=TIGHT, constraint=inn.Ball(1.0))
    assert torch.allclose(phi(theta), theta / theta.norm(), atol=1e-10)
    J = torch.autograd.functional.jacobian(phi, theta).reshape(2, 2)
    t = theta.reshape(-1)
    J_ref = (torch.eye(2) - torch.outer(t, t) / t.dot(t)) / t.norm()
    assert torch.allclose(J, J_ref, atol=1e-8)


def test_pytree_strategies_and_parameters(gen):
    B = 3
    targets = torch.randn(B, 2, generator=gen)

    def costs(phi, theta):
        w, b = phi["w"], phi["b"]
        scale, shift = theta
        centre = w.mean(0)
        return (0.5 * ((w - scale * targets) ** 2).sum(1) + 0.5 * (b - shift) ** 2 + 0.3 * (w * centre).sum(1)
                + 0.1 * b * w.sum(1))

    phi0 = {"w": torch.zeros(B, 2), "b": torch.zeros(B)}
    theta = (torch.tensor(1.5, requires_grad=True), torch.tensor(-0.5, requires_grad=True))
    phi = inn.nash_equilibrium(costs, phi0, theta, solver=TIGHT)
    assert set(phi) == {"w", "b"} and phi["w"].shape == (B, 2) and phi["b"].shape == (B,)
    with torch.no_grad():
        res = inn.CostGame(costs).residual(phi, theta)
    assert max(float(r.abs().max()) for r in res.values()) < 1e-10
    loss = (phi["w"] ** 2).sum() + phi["b"].sum()
    g = torch.autograd.grad(loss, theta)
    h = 1e-6
    for k in range(2):
        th_p = [t.detach().clone() for t in theta]
        th_m = [t.detach().clone() for t in theta]
        th_p[k] += h
        th_m[k] -= h
        lp = inn.nash_equilibrium(costs, phi0, tuple(th_p), solver=TIGHT)
        lm = inn.nash_equilibrium(costs, phi0, tuple(th_m), solver=TIGHT)
        fd = (((lp["w"] ** 2).sum() + lp["b"].sum()) - ((lm["w"] ** 2).sum() + lm["b"].sum())) / (2 * h)
        assert abs(float(fd - g[k])) <= 1e-6 * max(1.0, abs(float(fd)))


def test_aggregative_game_matches_cost_game(gen):
    B, d = 5, 3
    data = torch.randn(B, d, generator=gen)
    game = inn.AggregativeGame(
        local=lambda p, th, t: 0.5 * ((p - t) ** 2).sum() + 0.5 * ((p - th) ** 2).sum(),
        contribution=lambda p, th: ((p - th) ** 2).sum(),
        coupling=lambda p, th, s, t: 0.3 * ((p - th) ** 2).sum() / (1.0 + s) + 0.2 * (p * t).sum() * s,
        data=(data,))
    theta = torch.randn(d, generator=gen)
    phi = torch.randn(B, d, generator=gen)
    fast = game.pseudo_gradient(phi, theta)
    slow = inn.CostGame(game.costs).pseudo_gradient(phi, theta)
    assert torch.allclose(fast, slow, atol=1e-12)
    # derivatives of the pseudo-gradient (what the backward uses) agree as well
    Pf = torch.func.jacrev(game.pseudo_gradient, argnums=(0, 1))(phi, theta)
    Ps = torch.func.jacrev(inn.CostGame(game.costs).pseudo_gradient, argnums=(0, 1))(phi, theta)
    for a, b in zip(Pf, Ps):
        assert torch.allclose(a, b, atol=1e-12)


class _Costs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor([2.0, 3.0]))

    def forward(self, phi, theta):
        return 0.5 * self.weight * phi[:, 0] ** 2 - theta * phi[:, 0] + 0.1 * phi[:, 0] * phi.flip(0)[:, 0]


def test_nash_layer_passes_module_parameters():
    layer = inn.NashLayer(_Costs(), solver=TIGHT)
    theta = torch.tensor(1.0, requires_grad=True)
    phi = layer(torch.zeros(2, 1), theta)
    assert layer.last_solution.status == "converged"
    phi.sum().backward()
    assert layer.costs.weight.grad is not None
    # reference: equilibrium of [[w0, .1], [.1, w1]] phi = theta
    w = layer.costs.weight.detach().clone().requires_grad_(True)
    t = theta.detach().clone().requires_grad_(True)
    M = torch.stack([torch.stack([w[0], torch.tensor(0.1)]), torch.stack([torch.tensor(0.1), w[1]])])
    ref = torch.linalg.solve(M, t * torch.ones(2))
    ref.sum().backward()
    assert torch.allclose(layer.costs.weight.grad, w.grad, atol=1e-9)
    assert torch.allclose(theta.grad, t.grad, atol=1e-9)


def test_closure_over_parameters_is_refused():
    weight = torch.tensor(2.0, requires_grad=True)
    with pytest.raises(ValueError, match="not in theta"):
        inn.nash_equilibrium(lambda p, th: 0.5 * weight * (p[:, 0] - th) ** 2, torch.zeros(2, 1), torch.tensor(1.0))
    # the unrolled adjoint tracks closures through autograd, so it is allowed there
    phi = inn.nash_equilibrium(lambda p, th: 0.5 * weight * (p[:, 0] - th) ** 2, torch.zeros(2, 1),
                               torch.tensor(1.0), adjoint=inn.Unrolled())
    assert phi.requires_grad


def test_float32_case(gen):
    game = quadratic_game(B=3, d=2, p=2, cond=10.0, coupling=1.0, gen=gen, dtype=torch.float32)
    theta = torch.randn(2, generator=gen).float().requires_grad_(True)
    phi = inn.nash_equilibrium(game.costs, torch.zeros(3, 2, dtype=torch.float32), theta)
    assert phi.dtype == torch.float32
    (g,) = torch.autograd.grad(phi.sum(), theta)
    expected = game.jacobian().sum((0, 1))
    assert torch.linalg.norm(g - expected) <= 1e-4 * torch.linalg.norm(expected)


def test_return_info_reports_history(gen):
    game = quadratic_game(B=2, d=2, p=1, cond=10.0, coupling=1.0, gen=gen)
    sol = inn.nash_solution(game.costs, torch.zeros(2, 2), torch.zeros(1))
    assert isinstance(sol, inn.Solution) and sol.converged and sol.status == "converged"
    assert len(sol.history) == sol.steps and sol.steps > 1
    assert sol.residual <= sol.stats["tolerance"]
    assert sol.history[-1] < sol.history[0]
    assert math.isfinite(sol.stats["step_size"])


def test_unrolled_differentiates_through_the_initial_point():
    """MAML-style phi0 = theta: the unrolled gradient includes the path through phi0."""
    theta = torch.tensor([1.0, 2.0], requires_grad=True)
    lr = 0.5
    z = inn.solve_vi(lambda z, t: z - 3 * t, 1.0 * theta, theta,
                     solver=inn.SimultaneousGradient(step_size=lr, num_steps=1), adjoint=inn.Unrolled())
    (g,) = torch.autograd.grad(z.sum(), theta)
    # z1 = theta - lr (theta - 3 theta) = (1 + 2 lr) theta
    assert torch.allclose(g, torch.full((2,), 1 + 2 * lr))


def test_implicit_after_fixed_steps_warns_when_not_at_equilibrium():
    A = torch.tensor([[2.0, 1.0], [-1.0, 2.0]])
    solver = inn.SimultaneousGradient(step_size=0.1, num_steps=2)
    with pytest.warns(inn.ConvergenceWarning, match="only approximate"):
        inn.solve_vi(lambda z, t: A @ z - t, torch.zeros(2), torch.ones(2), solver=solver)
    # enough steps to reach the tolerance: no warning (filterwarnings=error would fail the test)
    sol = inn.vi_solution(lambda z, t: A @ z - t, torch.zeros(2), torch.ones(2),
                       solver=inn.SimultaneousGradient(step_size=0.3, num_steps=400))
    assert sol.status == "completed" and sol.residual <= sol.stats["tolerance"]
