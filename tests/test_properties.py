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
        exact = game.solution(theta)
        assert torch.linalg.norm(sol.value - exact) <= (1e-9 if tight else 1e-3) * (torch.linalg.norm(exact) + 1)
    # derivative: the layer's Krylov backward against a dense solve of the same fixed-point system
    J = torch.autograd.functional.jacobian(
        lambda t: inn.nash_equilibrium(game.costs, torch.zeros(B, d, dtype=dtype), t, solver=solver,
                                       constraint=constraint), theta)
    z = sol.value.detach()
    n = z.numel()
    Pz = torch.func.jacrev(G, argnums=0)(z, theta).reshape(n, n)
    Qz = torch.func.jacrev(G, argnums=1)(z, theta).reshape(n, p)
    J_ref = -torch.linalg.solve(Pz, Qz).reshape(B, d, p)
    tol = 1e-8 if tight else 1e-3
    assert torch.linalg.norm(J - J_ref) <= tol * (torch.linalg.norm(J_ref) + 1e-3)
    if constraint is None and tight:
        assert torch.linalg.norm(J - game.jacobian()) <= 1e-8 * torch.linalg.norm(game.jacobian())
