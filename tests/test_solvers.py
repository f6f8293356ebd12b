"""One contract for every forward solver: convergence to the closed form, status and history,
float32, and every configuration field has an effect."""
import dataclasses
import math

import pytest
import torch

import implicit_nash as inn
from zoo import quadratic_game


@pytest.fixture
def game(gen):
    return quadratic_game(B=3, d=2, p=2, cond=10.0, coupling=0.5, gen=gen)


def solvers_for(game):
    safe = game.mu / game.L ** 2
    return {
        "prgd-adaptive": inn.PRGD(rtol=1e-12),
        "prgd-constant": inn.PRGD(step_size=0.9 * (math.sqrt(2) - 1) / game.L, rtol=1e-12),
        "simultaneous": inn.SimultaneousGradient(step_size=safe, rtol=1e-12, max_steps=100000),
        "extragradient": inn.Extragradient(step_size=0.5 / game.L, rtol=1e-12),
        "gauss-seidel-cyclic": inn.GaussSeidel(step_size=safe, rtol=1e-12, max_steps=100000),
        "gauss-seidel-random": inn.GaussSeidel(step_size=safe, order="random", seed=3, rtol=1e-12,
                                               max_steps=100000),
        "gauss-seidel-explicit": inn.GaussSeidel(step_size=safe, order=[2, 0, 1], rtol=1e-12, max_steps=100000),
    }


NAMES = ["prgd-adaptive", "prgd-constant", "simultaneous", "extragradient", "gauss-seidel-cyclic",
         "gauss-seidel-random", "gauss-seidel-explicit"]


def _solve(game, solver, theta, **kw):
    return inn.nash_solution(game.costs, torch.zeros(game.B, game.d), theta, solver=solver, **kw)


@pytest.mark.parametrize("name", NAMES)
def test_contract_converges_to_closed_form(name, game, gen):
    solver = solvers_for(game)[name]
    theta = torch.randn(2, generator=gen, requires_grad=True)
    sol = _solve(game, solver, theta)
    assert sol.status == "converged"
    assert len(sol.history) == sol.steps
    assert sol.residual <= sol.stats["tolerance"]
    exact = game.solution(theta.detach())
    assert torch.linalg.norm(sol.value.detach() - exact) <= 1e-9 * torch.linalg.norm(exact)
    (g,) = torch.autograd.grad(sol.value.sum(), theta)
    expected = game.jacobian().sum((0, 1))
    assert torch.linalg.norm(g - expected) <= 1e-8 * torch.linalg.norm(expected)


@pytest.mark.parametrize("name", NAMES)
def test_contract_float32(name, gen):
    game = quadratic_game(B=3, d=2, p=2, cond=10.0, coupling=0.5, gen=gen, dtype=torch.float32)
    solver = dataclasses.replace(solvers_for(game)[name], rtol=None)
    theta = torch.randn(2, generator=gen).float()
    sol = inn.nash_solution(game.costs, torch.zeros(3, 2, dtype=torch.float32), theta, solver=solver)
    assert sol.value.dtype == torch.float32 and sol.status == "converged"
    exact = game.solution(theta)
    assert torch.linalg.norm(sol.value - exact) <= 1e-3 * torch.linalg.norm(exact)


@pytest.mark.parametrize("name", NAMES)
def test_contract_every_field_has_an_effect(name, game, gen):
    """Changing each field changes what the solver does (jaxopt's ProjectedGradient ignored one)."""
    base = solvers_for(game)[name]
    theta = torch.randn(2, generator=gen)
    ref = _solve(game, base, theta)
    changes = {
        "rtol": 1e-4, "atol": 1e-3, "max_steps": 3, "num_steps": 4,
        "step_size": (base.step_size or 0.05) * 0.5, "ratio": 0.1, "growth": 1.0,
        "order": "reverse" if getattr(base, "order", None) != "reverse" else "cyclic", "seed": 99,
    }
    for f in dataclasses.fields(base):
        new = changes[f.name]
        if f.name == "seed" and base.order != "random":
            continue  # the seed only drives the random order
        if f.name in ("ratio", "growth") and base.step_size is not None:
            continue  # documented: they tune the adaptive rule only
        if f.name == "order" and isinstance(base.order, tuple):
            new = "cyclic"
        solver = dataclasses.replace(base, **{f.name: new})
        if f.name in ("max_steps", "num_steps"):  # both stop early: not an equilibrium, so a warning
            with pytest.warns(inn.ConvergenceWarning):
                sol = _solve(game, solver, theta, throw=False)
        else:
            sol = _solve(game, solver, theta)
        differs = (sol.steps != ref.steps or sol.history != ref.history
                   or not torch.equal(sol.value, ref.value))
        assert differs, f"field {f.name} of {name} had no effect"


def test_num_steps_runs_exactly_algorithm_2(game, gen):
    theta = torch.randn(2, generator=gen)
    lr = 0.01
    sol = _solve(game, inn.SimultaneousGradient(step_size=lr, num_steps=7), theta, adjoint=inn.Unrolled())
    assert sol.status == "completed" and sol.steps == 7
    x = torch.zeros(game.B * game.d)
    for _ in range(7):
        x = x - lr * (game.A @ x + game.C @ theta + game.b)
    assert torch.allclose(sol.value.reshape(-1), x, atol=1e-14)


def test_prgd_constant_step_matches_the_update_rule(game, gen):
    theta = torch.randn(2, generator=gen)
    lam = 0.02
    sol = _solve(game, inn.PRGD(step_size=lam, num_steps=5), theta, constraint=inn.Box(-0.2, 0.2),
                 adjoint=inn.Unrolled())
    F = lambda x: game.A @ x + game.C @ theta + game.b
    x_prev = x = torch.zeros(game.B * game.d)
    for _ in range(5):
        x_prev, x = x, torch.clamp(x - lam * F(2 * x - x_prev), -0.2, 0.2)
    assert torch.allclose(sol.value.reshape(-1), x, atol=1e-14)


def test_order_and_initial_point_independence(game, gen):
    """Theorem 3.3: orders and initial points reach the same equilibrium."""
    theta = torch.randn(2, generator=gen)
    safe = game.mu / game.L ** 2
    values = []
    for order in ["cyclic", "reverse", "random"]:
        for scale in [0.0, 5.0]:
            phi0 = scale * torch.randn(game.B, game.d, generator=gen)
            values.append(inn.nash_equilibrium(game.costs, phi0, theta, solver=inn.GaussSeidel(
                step_size=safe, order=order, rtol=1e-12, max_steps=100000)))
    for v in values[1:]:
        assert torch.allclose(v, values[0], atol=1e-9)


def test_diverging_game_raises_with_history(gen):
    # F(z) = -z is anti-monotone: gradient play runs away from the unique zero.
    with pytest.raises(inn.ConvergenceError) as info:
        inn.solve_vi(lambda z, th: -z + th, torch.ones(3), torch.zeros(3),
                     solver=inn.SimultaneousGradient(step_size=0.5))
    err = info.value
    assert err.status == "diverged" and len(err.history) == err.steps > 1
    assert err.history[-1] > err.history[0]
    with pytest.raises(inn.ConvergenceError, match="diverged"):
        inn.solve_vi(lambda z, th: -z + th, torch.ones(3), torch.zeros(3))


def test_max_steps_raises_or_warns(game, gen):
    theta = torch.randn(2, generator=gen)
    with pytest.raises(inn.ConvergenceError) as info:
        _solve(game, inn.PRGD(max_steps=3), theta)
    assert info.value.status == "max_steps" and info.value.steps == 3
    with pytest.warns(inn.ConvergenceWarning, match="max_steps"):
        sol = _solve(game, inn.PRGD(max_steps=3), theta, throw=False)
    assert sol.status == "max_steps" and not sol.converged


def test_prgd_beats_simultaneous_on_rotational_game(gen):
    """With strong bilinear coupling, gradient play at step 1/L diverges; PRGD converges."""
    game = quadratic_game(B=2, d=2, p=1, cond=2.0, coupling=20.0, gen=gen)
    theta = torch.zeros(1)
    with pytest.warns(inn.ConvergenceWarning, match="diverged"):
        sim = _solve(game, inn.SimultaneousGradient(step_size=1 / game.L), theta, throw=False)
    assert sim.status == "diverged"
    assert _solve(game, inn.PRGD(), theta).status == "converged"


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "0.1"])
def test_bad_step_sizes_are_rejected(bad):
    for cls in (inn.SimultaneousGradient, inn.Extragradient, inn.GaussSeidel, inn.PRGD):
        with pytest.raises(ValueError, match="step_size"):
            cls(step_size=bad)


def test_bad_solver_fields_are_rejected():
    with pytest.raises(ValueError, match="max_steps"):
        inn.PRGD(max_steps=0)
    with pytest.raises(ValueError, match="rtol"):
        inn.PRGD(rtol=-1.0)
    with pytest.raises(ValueError, match="ratio"):
        inn.PRGD(ratio=0.5)
    with pytest.raises(ValueError, match="growth"):
        inn.PRGD(growth=0.5)
    with pytest.raises(ValueError, match="order"):
        inn.GaussSeidel(step_size=0.1, order="sideways")
    with pytest.raises(TypeError):
        inn.PRGD(0.1)  # keyword-only: PRGD(step_size=0.1)


@pytest.mark.parametrize("name", NAMES)
def test_warm_start_at_the_solution_stops_at_once(name, game, gen):
    """The tolerance must not be relative to the (tiny) initial residual of a warm start."""
    theta = torch.randn(2, generator=gen)
    exact = game.solution(theta)
    sol = inn.nash_solution(game.costs, exact, theta, solver=solvers_for(game)[name])
    assert sol.status == "converged" and sol.steps <= 2
