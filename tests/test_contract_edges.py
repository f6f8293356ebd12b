"""Edges of the failure contract: what the layer and the linear solvers accept, refuse and report
(CG on a system that is not symmetric, a forward that differentiates, copies of a layer, dtypes and
devices that cannot meet the tolerances, a compiler that is not there, numpy numbers, short reprs)."""
import copy
import pickle
import warnings

import numpy as np
import pytest
import torch

import implicit_nash as inn
import implicit_nash.linear_solve as ls
from implicit_nash.linear_solve import LinearSolveInfo
from implicit_nash.solvers import Solution

TIGHT = inn.PRGD(rtol=1e-13)


# ------------------------------------------------------------------ CG on a system that is not symmetric
def _potential(A):
    def costs(phi, th):  # every player's cost is the potential 1/2 phi'A phi - th'phi: F = A phi - th
        p = phi.reshape(-1)
        return (0.5 * p @ A @ p - th @ p).expand(phi.shape[0])
    return costs


def test_cg_backward_with_an_active_bound_runs_gmres_and_gives_the_reference_gradient(gen):
    B = 4
    M = torch.randn(B, B, generator=gen)
    A = M @ M.T + B * torch.eye(B)                      # symmetric positive definite: a potential game
    theta = torch.tensor([3.0 * float(A[0].sum()), 0.1, -0.2, 0.3], requires_grad=True)
    box = inn.Box(-1.0, 1.0)
    sol = inn.nash_solution(_potential(A), torch.zeros(B, 1), theta, solver=TIGHT, constraint=box,
                            adjoint=inn.Implicit(linear_solver=inn.CG(rtol=1e-12)), throw=False)
    z = sol.value.detach().reshape(-1)
    active = (z.abs() - 1).abs() < 1e-9
    assert bool(active[0]) and not bool(active[1:].any())  # the first player sits on its upper bound
    w = torch.randn(B, generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (g,) = torch.autograd.grad(sol.value.reshape(-1) @ w, theta)
    # the reference: dz/dtheta = 0 on the active entries, A_II^{-1} E_I on the free ones (-P^{-1}Q of
    # the fixed-point map z - clamp(z - F(z)) restricted to the free set)
    free = (~active).nonzero().reshape(-1)
    J = torch.zeros(B, B)
    J[free[:, None], free] = torch.linalg.inv(A[free[:, None], free])
    torch.testing.assert_close(g, J.T @ w, rtol=1e-9, atol=1e-11)
    info = sol.backward[-1]
    assert info.converged and "ran GMRES: the operator is not symmetric: u'Av - v'Au = " in info.message


def test_cg_on_a_non_symmetric_or_declared_non_symmetric_operator_runs_gmres(gen):
    A = torch.randn(6, 6, generator=gen) + 6 * torch.eye(6)
    b = torch.randn(6, generator=gen)
    x, info = inn.CG(rtol=1e-12).solve(A, b)
    assert info.converged and "ran GMRES: the operator is not symmetric" in info.message, info.message
    torch.testing.assert_close(x, torch.linalg.solve(A, b))
    op = inn.LinearOperator(lambda v: A @ v, symmetric=False)
    x, info = inn.CG(rtol=1e-12).solve(op, b)
    assert info.converged and "ran GMRES: the operator is declared non-symmetric" in info.message, info.message
    torch.testing.assert_close(x, torch.linalg.solve(A, b))
    x, info = inn.CG(rtol=1e-12).solve(torch.block_diag(A, 2 * A), torch.cat([b, b]), groups=2)
    assert info.converged and "ran GMRES" in info.message
    torch.testing.assert_close(x, torch.cat([torch.linalg.solve(A, b), torch.linalg.solve(2 * A, b)]))
    x, info = inn.Refined(solver=inn.CG(), rtol=1e-12).solve(A, b)
    assert info.converged and "refinement" in info.message and "ran GMRES" in info.message, info.message
    torch.testing.assert_close(x, torch.linalg.solve(A, b))


# ------------------------------------------------------------------ a forward that differentiates
def test_custom_root_forward_may_use_autograd():
    def residual(z, th):  # the gradient of 1/2 (z - th)^2 + z^4 / 4
        return z - th + z ** 3

    @inn.custom_root(residual)
    def minimise(z0, th):
        z = z0.clone()
        for _ in range(200):  # gradient descent with torch.autograd.grad
            z = z.detach().requires_grad_(True)
            f = 0.5 * ((z - th) ** 2).sum() + (z ** 4).sum() / 4
            (g,) = torch.autograd.grad(f, z)
            z = z - 0.3 * g
        for _ in range(20):  # a few Newton steps to working precision
            z = z - residual(z, th) / (1 + 3 * z ** 2)
        return z.detach()

    th = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    z = minimise(torch.zeros(3), th)
    torch.testing.assert_close(residual(z.detach(), th.detach()), torch.zeros(3), rtol=0, atol=1e-12)
    (g,) = torch.autograd.grad(z.sum(), th)
    torch.testing.assert_close(g, 1 / (1 + 3 * z.detach() ** 2))


# ------------------------------------------------------------------ copies of a layer
def _game_costs(phi, th):
    p = phi.reshape(-1)
    return torch.stack([0.5 * (p[0] - th) ** 2 + 0.2 * p[0] * p[1], 0.5 * p[1] ** 2 - 0.2 * p[0] * p[1]])


class _Costs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(1.5))

    def forward(self, phi, th):
        return self.scale * _game_costs(phi, th)


@pytest.mark.parametrize("costs", [_game_costs, _Costs()], ids=["function", "module"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_layer_survives_deepcopy_and_pickle_after_a_forward(costs, how):
    layer = inn.NashLayer(costs, solver=TIGHT)
    th = torch.tensor(1.0, requires_grad=True)
    out = layer(torch.zeros(2, 1), th)
    assert out.requires_grad and layer.last_solution.value.grad_fn is not None
    other = copy.deepcopy(layer) if how == "deepcopy" else pickle.loads(pickle.dumps(layer))
    kept = other.last_solution
    assert kept is not None and kept.status == "converged" and not kept.value.requires_grad
    torch.testing.assert_close(kept.value, out.detach())
    assert layer.last_solution.value.grad_fn is not None  # the original keeps its graph
    th2 = torch.tensor(1.0, requires_grad=True)
    again = other(torch.zeros(2, 1), th2)
    torch.testing.assert_close(again, out.detach())
    (g,) = torch.autograd.grad(again.sum(), th2)
    (g0,) = torch.autograd.grad(out.sum(), th)
    torch.testing.assert_close(g, g0)


# ------------------------------------------------------------------ dtypes and devices
def _F(z, th):
    return 2 * z - th


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_refused_at_the_layer_and_the_linear_solvers(dtype):
    with pytest.raises(ValueError, match=r"half precision cannot meet the layer's tolerances \(eps = .*compute "
                                         r"in float32 and cast"):
        inn.solve_vi(_F, torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype))
    with pytest.raises(ValueError, match="half precision"):  # theta's floating leaves too
        inn.solve_vi(_F, torch.zeros(3), torch.ones(3, dtype=dtype))
    with pytest.raises(ValueError, match="half precision"):
        inn.nash_equilibrium(_game_costs, torch.zeros(2, 1, dtype=dtype), torch.tensor(1.0, dtype=dtype))
    for solver in (inn.Dense(), inn.GMRES(), inn.CG(), inn.BiCGSTAB()):
        with pytest.raises(ValueError, match="half precision"):
            solver.solve(torch.eye(3, dtype=dtype), torch.ones(3, dtype=dtype))
    with pytest.raises(ValueError, match="half precision"):
        inn.Refined(precision=dtype)


def test_complex_and_meta_tensors_are_refused():
    c = torch.zeros(3, dtype=torch.complex128)
    with pytest.raises(ValueError, match="complex tensors are not supported"):
        inn.solve_vi(_F, c, torch.ones(3))
    with pytest.raises(ValueError, match="complex tensors are not supported"):
        inn.solve_vi(_F, torch.zeros(3), c + 1)
    with pytest.raises(ValueError, match="complex tensors are not supported"):
        inn.GMRES().solve(torch.eye(3, dtype=torch.complex128), c + 1)
    meta = torch.zeros(3, device="meta")
    with pytest.raises(ValueError, match="meta tensors carry no data"):
        inn.solve_vi(_F, meta, torch.ones(3))
    with pytest.raises(ValueError, match="meta tensors carry no data"):
        inn.solve_vi(_F, torch.zeros(3), torch.ones(3, device="meta"))
    for solver in (inn.Dense(), inn.GMRES(), inn.CG()):
        with pytest.raises(ValueError, match="meta tensors carry no data"):
            solver.solve(torch.eye(3, device="meta"), torch.ones(3, device="meta"))


def test_integer_leaves_of_theta_stay_allowed():
    th = (torch.ones(3), torch.tensor([1, 2, 3]))
    z = inn.solve_vi(lambda z, t: 2 * z - t[0] * t[1], torch.zeros(3), th, solver=TIGHT)
    torch.testing.assert_close(z, torch.tensor([0.5, 1.0, 1.5]))


# ------------------------------------------------------------------ a compiler that is not there
def test_a_failed_compilation_is_remembered_and_said_once(monkeypatch):
    monkeypatch.setattr(ls, "_COMPILED", {})
    monkeypatch.setattr(ls, "_UNAVAILABLE", {})
    attempts = []

    def broken(fn, backend, **kwargs):
        attempts.append(backend)
        raise RuntimeError("no working C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    A = torch.diag(torch.linspace(1.0, 10.0, 8))
    b = torch.ones(8)
    solver = inn.CG(rtol=1e-12, compiled=True)
    with pytest.warns(RuntimeWarning, match=r"compiled linear solve unavailable \(RuntimeError: no working C\+\+ "
                                            r"compiler\): running eagerly"):
        x, info = solver.solve(A, b)
    assert info.converged and "ran eagerly" in info.message and "no working C++ compiler" in info.message
    assert len(attempts) == 1
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        x2, info2 = solver.solve(A, 2 * b)
        x2, info2 = solver.solve(A, 2 * b)
    assert len(attempts) == 1 and not seen, [str(w.message) for w in seen]
    with pytest.warns(RuntimeWarning, match="compiled linear solve unavailable"):
        _, info3 = inn.BiCGSTAB(rtol=1e-12, compiled=True).solve(A, b)  # another chunk: its own attempt
    assert len(attempts) == 2
    assert info2.converged and "(ran eagerly: compiled linear solve unavailable (RuntimeError: no working C++ "\
        "compiler))" in info2.message, info2.message
    torch.testing.assert_close(x2, 2 * x)
    assert info3.converged and "ran eagerly" in info3.message


def test_a_tracing_failure_of_one_operator_is_not_remembered(monkeypatch):
    monkeypatch.setattr(ls, "_UNAVAILABLE", {})
    A = torch.diag(torch.linspace(1.0, 10.0, 8))
    b = torch.ones(8)

    def refuses_tracing(v, M):
        if torch.compiler.is_compiling():
            raise RuntimeError("not traceable")
        return M @ v

    op = inn.LinearOperator(lambda v: A @ v, symmetric=True, functional=(refuses_tracing, (A,)))
    _, info = inn.CG(rtol=1e-12, compiled=True, backend="aot_eager").solve(op, b)
    assert info.converged and "the compiled chunk failed" in info.message
    assert not ls._UNAVAILABLE


def test_the_meta_learning_compiled_programs_remember_a_missing_backend(monkeypatch):
    from implicit_nash.meta import inner
    monkeypatch.setattr(ls, "_UNAVAILABLE", {})
    attempts = []

    def broken(fn, backend, **kwargs):
        attempts.append(backend)
        raise RuntimeError("no working C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)

    def program(x):
        return 2 * x

    for _ in range(3):
        out, why = inner._try_compiled(program, "inductor", torch.ones(2))
        assert out is None and why == "RuntimeError: no working C++ compiler"
    assert len(attempts) == 1


# ------------------------------------------------------------------ numpy numbers
def test_numpy_numbers_are_accepted_and_stored_as_python_numbers():
    s = inn.PRGD(atol=np.float32(1e-6), rtol=np.float64(1e-9), max_steps=np.int64(500))
    assert type(s.atol) is float and type(s.rtol) is float and type(s.max_steps) is int
    assert s.atol == pytest.approx(1e-6) and s.max_steps == 500
    g = inn.GMRES(rtol=np.float32(1e-6), atol=np.int64(0), max_steps=np.int32(40), restart=np.int64(10))
    assert type(g.rtol) is float and type(g.atol) is int and type(g.max_steps) is int and type(g.restart) is int
    x, info = g.solve(2 * torch.eye(3), torch.ones(3))
    assert info.converged
    z = inn.solve_vi(_F, torch.zeros(3), torch.ones(3), solver=s)
    torch.testing.assert_close(z, 0.5 * torch.ones(3), rtol=0, atol=1e-5)  # atol=1e-6 in the residual

    @inn.custom_root(lambda z, th: z ** 3 - th, rtol=np.float32(1e-6), atol=np.float64(0.0),
                     linear_solver=inn.GMRES(max_steps=np.int64(20)))
    def cube_root(z0, th):
        return th ** (1 / 3)

    th = torch.tensor(8.0, requires_grad=True)
    z = cube_root(torch.ones(()), th)
    (gr,) = torch.autograd.grad(z, th)
    assert float(z.detach()) == pytest.approx(2.0) and float(gr) == pytest.approx(1 / 12)
    for bad in (np.bool_(True), True, np.float32(np.nan), np.float64(-1.0)):
        with pytest.raises(ValueError, match="atol"):
            inn.PRGD(atol=bad)
    with pytest.raises(ValueError, match="max_steps"):
        inn.GMRES(max_steps=np.float64(10.0))


# ------------------------------------------------------------------ short reprs
def test_solution_and_linear_solve_info_have_short_reprs():
    sol = Solution(torch.zeros(1000, 3), "converged", 10_000, 1e-9, [1.0] * 10_000, {"tolerance": 1e-8})
    sol.backward.append(LinearSolveInfo(True, 40, 42, 1e-12, 1e-11, [0.5] * 10_000, "converged"))
    text = repr(sol)
    assert len(text) < 300, text
    for part in ("converged", "steps=10000", "residual=1e-09", "(1000, 3)", "float64", "history=10000",
                 "backward=1"):
        assert part in text, text
    sol.error = "ConvergenceError('x')"
    assert "error=" in repr(sol) and len(repr(sol)) < 300
    info_text = repr(sol.backward[0])
    assert len(info_text) < 300, info_text
    for part in ("converged", "steps=40", "matvecs=42", "residual=1e-12", "tolerance=1e-11", "history=10000"):
        assert part in info_text, info_text
    # a value that is a pytree
    assert "dict" in repr(Solution({"a": torch.zeros(2)}, "max_steps", 1, 1.0))
