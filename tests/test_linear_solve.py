"""One contract for every linear solver: accuracy, reported info, refusal rules, field effects."""
import dataclasses

import pytest
import torch

import implicit_nash as inn


def spd(n, cond, gen):
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
    return Q @ torch.diag(torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n)) @ Q.T


def nonsymmetric(n, cond, gen):
    S = spd(n, cond, gen)
    K = torch.randn(n, n, generator=gen)
    return S + (K - K.T)


SOLVERS = {
    "cg": inn.CG(rtol=1e-12),
    "gmres": inn.GMRES(rtol=1e-12),
    "gmres-restart": inn.GMRES(rtol=1e-12, restart=5, max_steps=5000),
    "bicgstab": inn.BiCGSTAB(rtol=1e-12),
    "normal-cg": inn.NormalCG(rtol=1e-12, max_steps=5000),
    "neumann": inn.Neumann(step_size=0.01, rtol=1e-12, max_steps=50000),
    "dense": inn.Dense(rtol=1e-12),
}


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("form", ["matrix", "callable", "operator"])
def test_contract_solves_and_reports(name, form, gen):
    n = 30
    A = spd(n, 50.0, gen) if name in ("cg", "neumann") else nonsymmetric(n, 50.0, gen)
    b = torch.randn(n, generator=gen)
    op = {"matrix": A, "callable": lambda v: A @ v,
          "operator": inn.LinearOperator(lambda v: A @ v, lambda v: A.T @ v)}[form]
    if name == "normal-cg" and form == "callable":
        with pytest.raises(ValueError, match="transpose"):
            SOLVERS[name].solve(op, b)
        return
    x, info = SOLVERS[name].solve(op, b)
    assert isinstance(info, inn.LinearSolveInfo)
    assert info.converged and info.steps >= 1 and info.matvecs >= info.steps
    assert abs(info.residual - float(torch.linalg.norm(A @ x - b))) <= 1e-12 * float(b.norm())
    assert info.residual <= info.tolerance
    x_ref = torch.linalg.solve(A, b)
    assert torch.linalg.norm(x - x_ref) <= 1e-9 * torch.linalg.norm(x_ref)


@pytest.mark.parametrize("name", [k for k in SOLVERS if k != "dense"])
def test_contract_fields_have_effect(name, gen):
    n = 30
    A = spd(n, 50.0, gen) if name in ("cg", "neumann") else nonsymmetric(n, 50.0, gen)
    b = torch.randn(n, generator=gen)
    base = SOLVERS[name]
    _, ref = base.solve(A, b)
    changes = {"rtol": 1e-3, "atol": 1e-2 * float(b.norm()), "max_steps": 2, "restart": 2,
               "step_size": 0.005, "check_symmetry": False}
    for f in dataclasses.fields(base):
        if f.name == "check_symmetry":
            # the check costs two products; without it CG on this SPD matrix does the same iterations
            _, info = dataclasses.replace(base, check_symmetry=False).solve(A, b)
            assert info.matvecs == ref.matvecs - 2
            continue
        _, info = dataclasses.replace(base, **{f.name: changes[f.name]}).solve(A, b)
        assert (info.steps, info.residual) != (ref.steps, ref.residual), f"{name}.{f.name} had no effect"


def test_dense_field_effect(gen):
    A = torch.tensor([[1.0, 0.0], [0.0, 1e-17]])
    _, info = inn.Dense(rtol=1e-30).solve(A, torch.tensor([1.0, 1.0]))
    _, info_loose = inn.Dense(rtol=1.0).solve(A, torch.tensor([1.0, 1.0]))
    assert info_loose.converged and info.tolerance < info_loose.tolerance


def test_cg_refuses_non_symmetric(gen):
    A = nonsymmetric(10, 10.0, gen)
    with pytest.raises(ValueError, match="symmetric"):
        inn.CG().solve(A, torch.ones(10))
    with pytest.raises(ValueError, match="declared non-symmetric"):
        inn.CG().solve(inn.LinearOperator(lambda v: v, symmetric=False), torch.ones(10))


def test_cg_refuses_indefinite(gen):
    A = torch.diag(torch.tensor([1.0, -1.0, 2.0]))
    with pytest.raises(ValueError, match="curvature"):
        inn.CG().solve(A, torch.ones(3))


def test_neumann_reports_divergence():
    A = torch.diag(torch.tensor([1.0, 10.0]))
    x, info = inn.Neumann(step_size=1.0).solve(A, torch.ones(2))
    assert not info.converged and "diverged" in info.message


def test_zero_rhs_and_bad_rhs():
    for solver in SOLVERS.values():
        x, info = solver.solve(torch.eye(3), torch.zeros(3))
        assert info.converged and torch.equal(x, torch.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        inn.GMRES().solve(torch.eye(2), torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="1-D"):
        inn.GMRES().solve(torch.eye(2), torch.ones(2, 1))
    with pytest.raises(ValueError, match="restart"):
        inn.GMRES(restart=0)
