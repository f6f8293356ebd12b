"""Property-based tests: random strongly monotone games across shapes, player counts, dtypes and
constraint sets satisfy the equilibrium conditions and the implicit-derivative identity."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import implicit_nash as inn
from zoo import quadratic_game

SETS = {
    "reals": None,
    "box": inn.Box(-0.5, 0.5),
    "ball": inn.Ball(0.8),
    "nonnegative": inn.NonNegative(),
}


def fixed_point_residual(game, constraint):
    def G(z, theta):
        F = game.operator(z, theta)
        if constraint is None:
            return F
        return z - constraint.project(z - F, 1)
    return G


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 4), d=st.integers(1, 3), p=st.integers(1, 2), cond=st.floats(1.0, 50.0),
       coupling=st.floats(0.0, 2.0), seed=st.integers(0, 10_000), set_name=st.sampled_from(list(SETS)),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_random_games(B, d, p, cond, coupling, seed, set_name, dtype):
    gen = torch.Generator().manual_seed(seed)
    game = quadratic_game(B=B, d=d, p=p, cond=cond, coupling=coupling, gen=gen, dtype=dtype)
    theta = torch.randn(p, generator=gen).to(dtype)
    constraint = SETS[set_name]
    tight = dtype == torch.float64
    solver = inn.PRGD(rtol=1e-13 if tight else None, max_steps=50_000)
    sol = inn.nash_solution(game.costs, torch.zeros(B, d, dtype=dtype), theta, solver=solver,
                               constraint=constraint)
    assert sol.status == "converged" and sol.value.dtype == dtype
    G = fixed_point_residual(game, constraint)
    scale = float(torch.linalg.norm(game.C @ theta + game.b)) + 1.0
    assert float(torch.linalg.norm(G(sol.value, theta))) <= (1e-9 if tight else 1e-3) * scale

    if constraint is None:
        # the forward rule bounds the residual; the error is the residual amplified by up to cond (float32:
        # residual ~ rtol * L * |z| with the default rtol 6e-5, so the error can reach ~6e-5 * cond * |z|)
        exact = game.solution(theta)
        assert torch.linalg.norm(sol.value - exact) <= (1e-9 if tight else 1e-4 * cond) * (torch.linalg.norm(exact) + 1)
    # derivative: the layer's Krylov backward against a dense solve of the same fixed-point system
    J = torch.autograd.functional.jacobian(
        lambda t: inn.nash_equilibrium(game.costs, torch.zeros(B, d, dtype=dtype), t, solver=solver,
                                       constraint=constraint), theta)
    z = sol.value.detach()
    n = z.numel()
    Pz = torch.func.jacrev(G, argnums=0)(z, theta).reshape(n, n)
    Qz = torch.func.jacrev(G, argnums=1)(z, theta).reshape(n, p)
    J_ref = -torch.linalg.solve(Pz, Qz).reshape(B, d, p)
    # float32: the dense reference linearises the unit-step map at the float32 point, so it carries the
    # forward's error amplified by the projection's curvature (an active Ball: 1.5e-3 from the float64
    # truth where the layer's step-scaled map is 3.4e-4 from it)
    tol = 1e-8 if tight else 3e-3
    assert torch.linalg.norm(J - J_ref) <= tol * (torch.linalg.norm(J_ref) + 1e-3)
    if constraint is None and tight:
        assert torch.linalg.norm(J - game.jacobian()) <= 1e-8 * torch.linalg.norm(game.jacobian())


LINEAR_SOLVERS = {
    "gmres": inn.GMRES(),
    "bicgstab": inn.BiCGSTAB(),
    "normal-cg": inn.NormalCG(max_steps=5000),
    "dense": inn.Dense(),
}
ALL_SETS = dict(SETS, simplex=inn.Simplex())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 3), d=st.integers(2, 3), p=st.integers(1, 2), cond=st.floats(1.0, 30.0),
       coupling=st.floats(0.0, 2.0), seed=st.integers(0, 10_000), set_name=st.sampled_from(list(ALL_SETS)),
       dtype=st.sampled_from([torch.float64, torch.float32]), ls=st.sampled_from(list(LINEAR_SOLVERS)))
def test_random_games_dense_reference_or_a_convergence_error(B, d, p, cond, coupling, seed, set_name, dtype, ls):
    """Strongly monotone games x sets x dtypes x linear solvers: the layer's gradient equals the
    dense -P^-1 Q of the fixed-point system, or the layer raises ConvergenceError; never a wrong
    number and never another exception."""
    gen = torch.Generator().manual_seed(seed)
    game = quadratic_game(B=B, d=d, p=p, cond=cond, coupling=coupling, gen=gen, dtype=dtype)
    theta = torch.randn(p, generator=gen).to(dtype)
    constraint = ALL_SETS[set_name]
    tight = dtype == torch.float64
    solver = inn.PRGD(rtol=1e-13 if tight else None, max_steps=50_000)
    adjoint = inn.Implicit(linear_solver=LINEAR_SOLVERS[ls])
    v = torch.randn(B, d, generator=gen).to(dtype)
    th = theta.clone().requires_grad_(True)
    try:
        z = inn.nash_equilibrium(game.costs, torch.zeros(B, d, dtype=dtype), th, solver=solver,
                                 constraint=constraint, adjoint=adjoint)
        (g,) = torch.autograd.grad((z * v).sum(), th)
    except inn.ConvergenceError as err:
        assert err.status in ("max_steps", "diverged", "breakdown", "singular", "non_finite")
        return
    G = fixed_point_residual(game, constraint)
    zd = z.detach().double()
    A64, C64, b64 = game.A.double(), game.C.double(), game.b.double()

    def G64(zz, t):
        F = (A64 @ zz.reshape(-1) + C64 @ t + b64).reshape(B, d)
        return F if constraint is None else zz - constraint.project(zz - F, 1)
    n = zd.numel()
    P = torch.func.jacrev(G64, argnums=0)(zd, theta.double()).reshape(n, n)
    Q = torch.func.jacrev(G64, argnums=1)(zd, theta.double()).reshape(n, p)
    ref = -(torch.linalg.solve(P, Q)).T @ v.double().reshape(-1)
    tol = 1e-7 if tight else 2e-2
    assert torch.linalg.norm(g.double() - ref) <= tol * (torch.linalg.norm(ref) + 1e-3), (g, ref)
    del G


def _nonlinear_game(seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(4, 4, generator=gen, dtype=dtype)
    A = (A - A.T) + 3 * torch.eye(4, dtype=dtype)
    W = torch.randn(4, 2, generator=gen, dtype=dtype)
    return lambda z, th: A @ z + 0.3 * torch.tanh(z) - W @ torch.sin(th)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), t0=st.floats(-2, 2), t1=st.floats(-2, 2))
def test_second_derivatives_equal_unrolled(seed, t0, t1):
    F = _nonlinear_game(seed, torch.float64)
    c = torch.linspace(-1, 1, 4)
    th = torch.tensor([t0, t1])

    def loss(t, adjoint):
        # start away from the solution: an unrolled iteration started at z* (theta = 0 here) has one
        # step and differentiates that truncated step, not the equilibrium
        z = inn.solve_vi(F, torch.ones(4), t, solver=inn.PRGD(rtol=1e-14, max_steps=50_000), adjoint=adjoint)
        return (z @ c) * (t ** 2).sum() + (z ** 2).sum()

    H = torch.autograd.functional.hessian(lambda t: loss(t, None), th)
    H_unrolled = torch.autograd.functional.hessian(lambda t: loss(t, inn.Unrolled()), th)
    assert torch.allclose(H, H_unrolled, atol=1e-7, rtol=1e-6)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), nb=st.integers(1, 5), set_name=st.sampled_from(["reals", "box", "ball"]))
def test_vmap_equals_a_loop(seed, nb, set_name):
    F = _nonlinear_game(seed, torch.float64)
    thetas = torch.randn(nb, 2, generator=torch.Generator().manual_seed(seed)) * 2
    solve = lambda t: inn.solve_vi(F, torch.zeros(4), t, solver=inn.PRGD(rtol=1e-13), constraint=SETS[set_name])
    batched = torch.func.vmap(solve)(thetas)
    loop = torch.stack([solve(t) for t in thetas])
    assert torch.allclose(batched, loop, atol=1e-9)
    jb = torch.func.vmap(torch.func.jacrev(solve))(thetas)
    jl = torch.stack([torch.func.jacrev(solve)(t) for t in thetas])
    assert torch.allclose(jb, jl, atol=1e-7)
