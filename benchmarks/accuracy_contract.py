"""The accuracy contract on the cases that motivated it: forward errors against the start and the
scale of F, and backward (implicit linear solve) errors against the condition number, with the
layer's own error estimates beside the true errors.

    python benchmarks/accuracy_contract.py
"""
import math

import torch

import implicit_nash as inn


def forward_cases():
    print("forward, float32: a box-constrained VI with F scaled by s (same point and gradient expected)")
    P = torch.tensor([[2., 1.], [-1., 2.]])
    for s in (1.0, 1e4):
        th = torch.tensor([3.0, -0.2], requires_grad=True)
        sol = inn.vi_solution(lambda z, t: s * (P @ z - t), torch.zeros(2), th, constraint=inn.Box(-0.5, 0.5),
                              throw=False)
        sol.value.sum().backward()
        print(f"  s = {s:g}: {sol.status}, {sol.steps} steps, z = {sol.value.tolist()}, grad = {th.grad.tolist()}, "
              f"estimated error {sol.error:.2e}")
    print("forward, float32: A = [[.6, .5], [-.5, .3]], theta = [.01, -.02], from three starts")
    A = torch.tensor([[.6, .5], [-.5, .3]])
    th = torch.tensor([.01, -.02])
    exact = torch.linalg.solve(A.double(), th.double())
    for z0 in (torch.zeros(2), torch.ones(2), 100 * torch.ones(2)):
        sol = inn.vi_solution(lambda z, t: A @ z - t, z0, th, throw=False)
        err = float((sol.value.double() - exact).norm())
        print(f"  z0 = {z0.tolist()}: {sol.status}, relative error {err / float(exact.norm()):.2e}, "
              f"estimate / true error {sol.error / err:.2f}")


def backward_cases(n=20):
    print(f"backward: A x = b, n = {n}, relative errors (true / estimated) and status")
    for dtype, conds in ((torch.float32, (1e2, 1e4, 1e6)), (torch.float64, (1e4, 1e6, 1e9))):
        for cond in conds:
            row = []
            for name, solver in (("GMRES", inn.GMRES()), ("BiCGSTAB", inn.BiCGSTAB()),
                                 ("NormalCG", inn.NormalCG(max_steps=5000)), ("CG", inn.CG()), ("Dense", inn.Dense())):
                g = torch.Generator().manual_seed(0)
                Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
                A = Q @ torch.diag(torch.logspace(0, math.log10(cond), n, dtype=torch.float64)) @ Q.T
                if name != "CG":
                    K = torch.randn(n, n, generator=g, dtype=torch.float64)
                    A = A + 0.3 * (K - K.T)
                b = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
                x, info = solver.solve(A.to(dtype), b.to(dtype))
                truth = torch.linalg.solve(A, b)
                err = float((x.double() - truth).norm() / truth.norm())
                row.append(f"{name} {err:.1e}/{info.error / float(truth.norm()):.1e} {info.status}")
            print(f"  {str(dtype)[6:]} cond {cond:.0e}: " + "; ".join(row))


if __name__ == "__main__":
    forward_cases()
    backward_cases()
