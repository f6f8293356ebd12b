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
            assert info.matvecs <= ref.matvecs - 2
            continue
        if f.name == "min_steps":  # a loose tolerance stops GMRES early, unless min_steps holds it
            if base.restart < 20:  # (a cycle's dimension: capped by the restart, checked on plain GMRES)
                continue
            _, loose = dataclasses.replace(base, rtol=1e-3).solve(A, b)
            _, held = dataclasses.replace(base, rtol=1e-3, min_steps=loose.steps + 5).solve(A, b)
            assert held.steps >= min(n, loose.steps + 5) and held.steps > loose.steps and held.converged
            continue
        if f.name in ("compiled", "chunk", "backend"):  # the same answer, computed by a compiled program
            chunk = 3 if f.name == "chunk" else 10
            _, info = dataclasses.replace(base, compiled=True, chunk=chunk, backend="aot_eager").solve(A, b)
            assert f"compiled in chunks of {chunk}, backend aot_eager" in info.message, info.message
            assert info.converged and info.residual <= info.tolerance
            continue
        _, info = dataclasses.replace(base, **{f.name: changes[f.name]}).solve(A, b)
        assert (info.steps, info.residual) != (ref.steps, ref.residual), f"{name}.{f.name} had no effect"


def test_dense_field_effect(gen):
    A = torch.tensor([[1.0, 0.0], [0.0, 1e-6]])
    _, info = inn.Dense(rtol=1e-30).solve(A, torch.tensor([1.0, 1.0]))
    _, info_loose = inn.Dense(rtol=1.0).solve(A, torch.tensor([1.0, 1.0]))
    assert info_loose.converged and info.tolerance < info_loose.tolerance


def test_cg_hands_a_non_symmetric_operator_to_gmres(gen):
    A = nonsymmetric(10, 10.0, gen)
    b = torch.ones(10)
    x, info = inn.CG().solve(A, b)
    assert info.converged and "ran GMRES: the operator is not symmetric" in info.message, info.message
    assert torch.allclose(x, torch.linalg.solve(A, b), atol=1e-8)
    x, info = inn.CG().solve(inn.LinearOperator(lambda v: v, symmetric=False), b)
    assert info.converged and "ran GMRES: the operator is declared non-symmetric" in info.message
    assert torch.allclose(x, b)


def test_cg_refuses_indefinite(gen):
    A = torch.diag(torch.tensor([1.0, -1.0, 2.0]))
    x, info = inn.CG().solve(A, torch.ones(3))
    assert info.status == "breakdown" and not info.converged and "curvature" in info.message
    assert torch.isfinite(x).all()


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


# ----------------------------------------------------------------- the failure contract (issue 12)
def skew(n=2):
    return torch.tensor([[0.0, 1.0], [-1.0, 0.0]]) if n == 2 else None


def test_bicgstab_breakdown_on_skew_is_a_status_not_a_zero_division():
    x, info = inn.BiCGSTAB().solve(skew(), torch.tensor([1.0, 2.0]))
    assert info.status == "breakdown" and not info.converged and "GMRES" in info.message
    assert torch.isfinite(x).all()
    x, info = inn.GMRES().solve(skew(), torch.tensor([1.0, 2.0]))  # GMRES handles it
    assert info.converged and torch.allclose(skew() @ x, torch.tensor([1.0, 2.0]))


def test_dense_singular_is_a_status_not_a_linalg_error():
    A = torch.tensor([[1.0, 2.0], [2.0, 4.0]])
    x, info = inn.Dense().solve(A, torch.tensor([1.0, 0.0]))
    assert info.status == "singular" and not info.converged
    # nearly singular: LU succeeds but the solution's norm shows the condition number
    A = torch.tensor([[1.0, 1.0], [1.0, 1.0 + 1e-17]])
    x, info = inn.Dense().solve(A, torch.tensor([1.0, 0.0]))
    assert info.status == "singular" and not info.converged


@pytest.mark.parametrize("name", ["gmres", "bicgstab", "cg", "normal-cg", "neumann"])
def test_nan_product_reports_non_finite(name):
    calls = []

    def op(v):
        calls.append(1)
        d = torch.tensor([1.0, 1.5, 2.0, 3.0])
        return v * float("nan") if len(calls) > 2 else d * v
    solver = dataclasses.replace(SOLVERS[name], rtol=1e-14)
    x, info = solver.solve(inn.LinearOperator(op, op, symmetric=True), torch.ones(4))
    assert not info.converged
    assert info.status in ("non_finite", "diverged", "breakdown") and "max_steps" not in info.message
    assert torch.isfinite(x).all()


def test_rtol_and_atol_zero_are_accepted():
    A = torch.diag(torch.tensor([1.0, 2.0, 4.0]))
    x, info = inn.GMRES(rtol=0.0, atol=0.0).solve(A, torch.ones(3))
    assert info.tolerance == 0.0
    assert torch.allclose(x, torch.tensor([1.0, 0.5, 0.25]))
    with pytest.raises(ValueError, match="rtol"):
        inn.GMRES(rtol=-1.0)


@pytest.mark.parametrize("cond", [1e4, 1e5])
def test_an_exact_solve_meets_the_residual_rule_and_its_error_is_held_to_the_tolerance(cond):
    """An LU solution in float32 meets the backward-stable residual rule (the old rule
    ||Ax - b|| <= rtol ||b|| failed it at cond 1e4); its error, about cond * eps relative at worst, is
    then held to sqrt(eps) = 3.5e-4 through an estimate that is not below the truth: it converges at
    cond 1e4 and is reported "inaccurate" at 1e5; in float64 both converge."""
    gen = torch.Generator().manual_seed(0)
    n = 40
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
    A64 = Q @ torch.diag(torch.logspace(0, float(torch.log10(torch.tensor(cond))), n)) @ Q.T
    b64 = torch.randn(n, generator=gen)
    A, b = A64.float(), b64.float()
    truth = torch.linalg.solve(A64, b64)
    x, info = inn.Dense().solve(A, b)
    error = float((x.double() - truth).norm())
    assert info.residual <= info.tolerance and error <= info.error <= 100 * error
    if cond == 1e4:
        assert info.converged and error <= 3.5e-4 * float(truth.norm())
    else:
        assert info.status == "inaccurate" and "exceeds" in info.message
    x2, info2 = inn.GMRES().solve(A, b)
    assert info2.norm_estimate <= float(torch.linalg.matrix_norm(A, 2)) * (1 + 1e-5)
    assert info2.converged or info2.status == "inaccurate"
    if info2.converged:
        assert float((x2.double() - truth).norm()) <= 3.5e-4 * float(truth.norm())
    x3, info3 = inn.Dense().solve(A64, b64)
    assert info3.converged and float((x3 - truth).norm()) <= info3.error


def test_gmres_keeps_its_best_iterate_and_flags_a_singular_system():
    gen = torch.Generator().manual_seed(0)
    n = 30
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
    A = (Q @ torch.diag(torch.logspace(0, 10, n)) @ Q.T).float()
    b = torch.randn(n, generator=gen).float()
    x, info = inn.GMRES(max_steps=300).solve(A, b)
    assert torch.isfinite(x).all()
    assert not info.converged and info.status in ("singular", "max_steps", "non_finite")
    assert info.residual <= float(b.norm()) * (1 + 1e-6)  # never worse than x = 0


def test_dense_rejects_max_steps_and_cg_check_symmetry_true_tests_a_tagged_operator():
    with pytest.raises(ValueError, match="max_steps"):
        inn.Dense(max_steps=10)
    A = torch.tensor([[2.0, 1.0], [0.0, 2.0]])
    tagged = inn.LinearOperator(lambda v: A @ v, symmetric=True)
    x, info = inn.CG(check_symmetry=True).solve(tagged, torch.ones(2))
    assert info.converged and "ran GMRES: the operator is not symmetric" in info.message
    assert torch.allclose(x, torch.linalg.solve(A, torch.ones(2)))


@pytest.mark.parametrize("name", ["gmres", "bicgstab", "cg", "dense", "neumann", "normal-cg"])
def test_groups_solve_a_batch_of_systems_each_to_its_own_tolerance(name, gen):
    g, n = 3, 6
    mats = [spd(n, 20.0, gen) * s for s in (1.0, 1e-1, 1e1)]
    if name == "neumann":
        mats = [spd(n, 3.0, gen) / 3.0 for _ in range(g)]
    bs = [torch.randn(n, generator=gen) * s for s in (1.0, 1e2, 1e-2)]
    big = torch.block_diag(*mats)
    solver = dataclasses.replace(SOLVERS[name], rtol=1e-10)
    x, info = solver.solve(inn.LinearOperator(lambda v: big @ v, lambda v: big.T @ v, symmetric=True),
                           torch.cat(bs), groups=g)
    assert info.converged and len(info.group_residuals) == g
    for k in range(g):
        ref = torch.linalg.solve(mats[k], bs[k])
        assert torch.linalg.norm(x[k * n:(k + 1) * n] - ref) <= 1e-6 * torch.linalg.norm(ref)
    with pytest.raises(ValueError, match="groups"):
        solver.solve(big, torch.cat(bs), groups=4)


def test_cg_takes_its_steps_per_block_of_a_stack():
    """Blocks with different spectra: each converges at its own rate, in one product per iteration."""
    torch.manual_seed(0)
    blocks, rhs = [], []
    for cond in (2.0, 10.0, 1000.0):
        Q, _ = torch.linalg.qr(torch.randn(30, 30, dtype=torch.float64))
        blocks.append((Q * torch.linspace(1, cond, 30, dtype=torch.float64)) @ Q.T)
        rhs.append(torch.randn(30, dtype=torch.float64))
    A, b = torch.block_diag(*blocks), torch.cat(rhs)
    sym = (A + A.T) / 2
    x, info = inn.CG(rtol=1e-12).solve(sym, b, groups=3)
    assert info.converged and torch.allclose(x, torch.linalg.solve(sym, b), rtol=1e-9, atol=1e-12)
    assert len(info.group_residuals) == 3 and all(r <= t for r, t in zip(info.group_residuals, info.group_tolerances))
    alone = max(inn.CG(rtol=1e-12).solve((B + B.T) / 2, c)[1].matvecs for B, c in zip(blocks, rhs))
    joint = inn.CG(rtol=1e-12).solve(sym, b)[1].matvecs
    # (+ the symmetry test, the final check and the error estimate's Arnoldi run of 20 products)
    assert info.matvecs <= alone + 3 + 20 < joint
    # a block that is not positive definite is named
    bad = torch.block_diag(sym[:30, :30], -torch.eye(30, dtype=torch.float64), sym[60:, 60:])
    _, info = inn.CG().solve(bad, b, groups=3)
    assert info.status == "breakdown" and "block 1" in info.message


def test_gmres_builds_one_krylov_space_per_block_of_a_stack():
    torch.manual_seed(1)
    blocks, rhs = [], []
    for spread in (0.1, 1.0, 30.0):
        K = torch.randn(25, 25, dtype=torch.float64)
        blocks.append(torch.eye(25, dtype=torch.float64) * (1 + spread) + spread * (K - K.T) / 5
                      + torch.diag(torch.linspace(0, spread, 25, dtype=torch.float64)))
        rhs.append(torch.randn(25, dtype=torch.float64) * 10 ** len(rhs))
    A, b = torch.block_diag(*blocks), torch.cat(rhs)
    for restart in (50, 7):
        x, info = inn.GMRES(rtol=1e-12, restart=restart).solve(A, b, groups=3)
        assert info.converged and torch.allclose(x, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-12), restart
        assert all(r <= t for r, t in zip(info.group_residuals, info.group_tolerances))
    alone = max(inn.GMRES(rtol=1e-12).solve(B, c)[1].matvecs for B, c in zip(blocks, rhs))
    joint = inn.GMRES(rtol=1e-12).solve(A, b)[1].matvecs
    _, info = inn.GMRES(rtol=1e-12).solve(A, b, groups=3)
    assert info.matvecs <= alone + 1 < joint
    # a zero block and a block solved exactly by its first direction
    b0 = torch.cat([torch.zeros(25, dtype=torch.float64), rhs[1], rhs[2]])
    x, info = inn.GMRES(rtol=1e-12).solve(torch.block_diag(torch.eye(25, dtype=torch.float64) * 3, *blocks[1:]),
                                          b0, groups=3)
    assert info.converged and torch.equal(x[:25], torch.zeros(25, dtype=torch.float64))
    # a product that is NaN in one block is reported, not hidden
    A_nan = A.clone()
    A_nan[30, 31] = float("nan")
    _, info = inn.GMRES().solve(A_nan, b, groups=3)
    assert info.status == "non_finite" and not info.converged


@pytest.mark.parametrize("steps", [1, 3, 5, 11])
def test_cg_with_a_small_budget_returns_its_last_iterate(steps):
    """A fixed budget (iMAML's) between two of CG's full checks must not lose the iterate."""
    torch.manual_seed(2)
    Q, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64))
    A = (Q * torch.linspace(1, 50, 40, dtype=torch.float64)) @ Q.T
    A = (A + A.T) / 2
    b = torch.randn(40, dtype=torch.float64)
    x, info = inn.CG(rtol=0.0, max_steps=steps, check_symmetry=False).solve(A, b)
    # exact CG iterates in exact arithmetic: compare with a dense Krylov projection of the same size
    K = torch.stack([torch.linalg.matrix_power(A, k) @ b for k in range(steps)], 1)
    Qk, _ = torch.linalg.qr(K)
    y = Qk @ torch.linalg.solve(Qk.T @ A @ Qk, Qk.T @ b)
    assert info.status == "max_steps" and torch.allclose(x, y, rtol=1e-6, atol=1e-8)
    assert (A @ x - b).norm() < b.norm()
