"""Bad input gets a clear error naming the problem, never a silent NaN."""
import pytest
import torch

import implicit_nash as inn


def costs(phi, theta):
    return 0.5 * ((phi - theta) ** 2).sum(1)


def test_costs_of_wrong_shape():
    with pytest.raises(ValueError, match=r"shape \(B,\) = \(3,\)"):
        inn.nash_equilibrium(lambda p, t: costs(p, t).sum(), torch.zeros(3, 2), torch.zeros(2))
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        inn.nash_equilibrium(lambda p, t: 0.5 * (p - t) ** 2, torch.zeros(3, 2), torch.zeros(2))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs(bad):
    theta = torch.tensor([0.0, bad])
    with pytest.raises(ValueError, match="theta contains NaN or inf"):
        inn.nash_equilibrium(costs, torch.zeros(3, 2), theta)
    phi0 = torch.zeros(3, 2)
    phi0[1, 1] = bad
    with pytest.raises(ValueError, match="phi0 contains NaN or inf"):
        inn.nash_equilibrium(costs, phi0, torch.zeros(2))
    with pytest.raises(ValueError, match="z0 contains NaN or inf"):
        inn.solve_vi(lambda z, t: z - t, phi0[1], torch.zeros(2))


def test_operator_nan_at_start_and_wrong_output():
    with pytest.raises(ValueError, match="NaN or inf at the initial point"):
        inn.solve_vi(lambda z, t: torch.log(z - 1) + t, torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="shaped like z0"):
        inn.solve_vi(lambda z, t: z.sum(), torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="NaN or inf at the initial point phi0"):
        inn.nash_equilibrium(lambda p, t: costs(p, t) * float("nan"), torch.zeros(2, 1), torch.zeros(1))


def test_player_dimension_mismatch_and_types():
    with pytest.raises(ValueError, match="player dimension first"):
        inn.nash_equilibrium(lambda p, t: p["a"].sum(1), {"a": torch.zeros(3, 2), "b": torch.zeros(2)}, torch.zeros(()))
    with pytest.raises(TypeError, match="floating point"):
        inn.solve_vi(lambda z, t: z, torch.zeros(2, dtype=torch.long), torch.zeros(()))
    with pytest.raises(TypeError, match="theta must be a tensor"):
        inn.solve_vi(lambda z, t: z, torch.zeros(2), {"a": 1.0})
    with pytest.raises(TypeError, match="solver must be a Solver"):
        inn.solve_vi(lambda z, t: z, torch.zeros(2), torch.zeros(()), solver="prgd")
    with pytest.raises(TypeError, match="adjoint must be"):
        inn.solve_vi(lambda z, t: z, torch.zeros(2), torch.zeros(()), adjoint="implicit")
    with pytest.raises(TypeError, match="linear_solver must be"):
        inn.Implicit(linear_solver="gmres")
    with pytest.raises(ValueError, match="leading dimension"):
        inn.nash_equilibrium(costs, torch.tensor(1.0), torch.zeros(()))


def test_bad_sets():
    with pytest.raises(ValueError, match="lower <= upper"):
        inn.Box(1.0, 0.0)
    with pytest.raises(ValueError, match="radius"):
        inn.Ball(0.0)
    with pytest.raises(ValueError, match="total"):
        inn.Simplex(total=-1.0)
    with pytest.raises(ValueError, match="needs a local term"):
        inn.AggregativeGame()
    with pytest.raises(ValueError, match="give both or neither"):
        inn.AggregativeGame(local=lambda p, t: p.sum(), coupling=lambda p, t, s: s)


def test_backward_linear_solve_failure_is_reported():
    theta = torch.tensor([1.0, 2.0], requires_grad=True)
    A = torch.tensor([[1.0, 0.0], [0.0, 100.0]])
    slow = inn.Implicit(linear_solver=inn.Neumann(step_size=0.001, max_steps=5))
    z = inn.solve_vi(lambda z, t: A @ z - t, torch.zeros(2), theta, adjoint=slow)
    with pytest.raises(inn.ConvergenceError, match="linear solve"):
        z.sum().backward()
    z = inn.solve_vi(lambda z, t: A @ z - t, torch.zeros(2), theta, adjoint=slow, throw=False)
    with pytest.warns(inn.ConvergenceWarning, match="linear solve"):
        z.sum().backward()
