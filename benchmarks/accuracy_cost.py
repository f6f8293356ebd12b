"""What the accuracy contract costs per call: forward + implicit backward of the layer on three small
problems, in-process medians.  Run it once per checkout and compare (paired, alternating runs)::

    for i in 1 2 3; do PYTHONPATH=<old checkout> python benchmarks/accuracy_cost.py; \
                       PYTHONPATH=. python benchmarks/accuracy_cost.py; done

Cases (float64, fixed seeds):

* ``box2``: the 2x2 non-symmetric VI on the box [-0.5, 0.5]^2 (PRGD, default tolerances);
* ``vi100``: a d = 100 strongly monotone non-symmetric linear VI (PRGD, GMRES backward);
* ``cg1000``: the SPD system of ``implicit_vs_peers.py`` (d = 1000, condition 100): a CG forward,
  ``solve_vi`` started at its answer with that script's ``PRGD`` (``atol`` the CG answer's error bound),
  ``Implicit(CG(rtol=1e-10))`` backward.
"""
import json
import math
import statistics
import sys
import time

import torch

import implicit_nash as inn

torch.set_default_dtype(torch.float64)
torch.set_num_threads(1)


def _time(fn, reps):
    fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def box2():
    P = torch.tensor([[2., 1.], [-1., 2.]])
    th = torch.tensor([3.0, -0.2], requires_grad=True)

    def call():
        z = inn.solve_vi(lambda z, t: P @ z - t, torch.zeros(2), th, constraint=inn.Box(-0.5, 0.5))
        torch.autograd.grad(z.sum(), th)
    return call


def vi100():
    g = torch.Generator().manual_seed(0)
    n = 100
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    A = Q @ torch.diag(torch.linspace(1, 10, n)) @ Q.T
    K = torch.randn(n, n, generator=g)
    A = A + 0.5 * (K - K.T) / math.sqrt(n)
    th = torch.randn(n, generator=g, requires_grad=True)

    def call():
        z = inn.solve_vi(lambda z, t: A @ z - t, torch.zeros(n), th)
        torch.autograd.grad(z.sum(), th)
    return call


def cg1000():
    g = torch.Generator().manual_seed(0)
    n = 1000
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    H = Q @ torch.diag(torch.linspace(1, 100, n)) @ Q.T
    H = (H + H.T) / 2
    th = torch.randn(n, generator=g, requires_grad=True)
    target = torch.randn(n, generator=g)
    cg = inn.CG(rtol=1e-10)
    # the CG answer's error bound, 1e-10 (|H| |z| + |theta|) / lambda_min with lambda in [1, 100]
    attach = inn.PRGD(rtol=1e-10, atol=1e-10 * 101 * float(th.detach().norm()))

    def call():
        z0, _ = cg.solve(H, th.detach())
        z = inn.solve_vi(lambda z, t: H @ z - t, z0, th, symmetric=True, solver=attach,
                         adjoint=inn.Implicit(linear_solver=cg))
        torch.autograd.grad(0.5 * ((z - target) ** 2).sum(), th)
    return call


if __name__ == "__main__":
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    result = {name: _time(case(), reps if name != "cg1000" else max(5, reps // 3)) * 1e3
              for name, case in (("box2", box2), ("vi100", vi100), ("cg1000", cg1000))}
    print(json.dumps({"implicit_nash": inn.__file__, "ms_per_call": result}))
