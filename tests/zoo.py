"""Shared problem zoo: strongly monotone quadratic games with closed-form equilibria and a chosen
condition number, and matrix games on simplices with known equilibria."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuadraticGame:
    """F(phi; theta) = A vec(phi) + C theta + b with A = S + K, S SPD (eigenvalues in [1, cond]),
    K skew-symmetric with zero diagonal blocks (bilinear coupling between players).

    Player i's cost: f_i = 1/2 phi_i' S_ii phi_i + phi_i' (sum_{j != i} A_ij phi_j + (C theta + b)_i),
    so F_i = df_i/dphi_i; a potential game (symmetric Jacobian) iff K = 0."""

    B: int
    d: int
    p: int
    A: torch.Tensor
    C: torch.Tensor
    b: torch.Tensor

    @property
    def symmetric(self) -> bool:
        return bool(torch.allclose(self.A, self.A.T))

    @property
    def mu(self) -> float:
        return float(torch.linalg.eigvalsh(0.5 * (self.A + self.A.T)).min())

    @property
    def L(self) -> float:
        return float(torch.linalg.matrix_norm(self.A, ord=2))

    def costs(self, phi, theta):
        B, d = self.B, self.d
        blocks = self.A.reshape(B, d, B, d)
        idx = torch.arange(B)
        diag = blocks[idx, :, idx, :]                      # (B, d, d), symmetric
        off = self.A - torch.block_diag(*diag)
        x = phi.reshape(-1)
        lin = (off @ x + self.C @ theta + self.b).reshape(B, d)
        quad = 0.5 * torch.einsum("bi,bij,bj->b", phi, diag, phi)
        return quad + (phi * lin).sum(1)

    def operator(self, phi, theta):
        return (self.A @ phi.reshape(-1) + self.C @ theta + self.b).reshape(self.B, self.d)

    def solution(self, theta):
        return torch.linalg.solve(self.A, -(self.C @ theta + self.b)).reshape(self.B, self.d)

    def jacobian(self):
        """d phi*/d theta = -A^{-1} C, shape (B, d, p)."""
        return -torch.linalg.solve(self.A, self.C).reshape(self.B, self.d, self.p)


def quadratic_game(B=3, d=2, p=2, cond=10.0, coupling=1.0, *, gen, dtype=torch.float64):
    n = B * d
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    eig = torch.logspace(0, torch.log10(torch.tensor(float(cond))).item(), n, dtype=torch.float64)
    S = Q @ torch.diag(eig) @ Q.T
    S = 0.5 * (S + S.T)
    K = torch.randn(n, n, generator=gen, dtype=torch.float64)
    K = K - K.T
    mask = torch.block_diag(*[torch.ones(d, d, dtype=torch.float64)] * B).bool()
    K = K.masked_fill(mask, 0.0)
    K = coupling * K / max(float(torch.linalg.matrix_norm(K, ord=2)), 1e-12) * float(cond) ** 0.5
    A = (S + K).to(dtype)
    C = torch.randn(n, p, generator=gen, dtype=torch.float64).to(dtype)
    b = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    return QuadraticGame(B, d, p, A, C, b)


def matrix_game_2x2(theta):
    """Zero-sum 2x2 game: the row player minimises x' M y, the column player maximises it, with
    M = [[t0, t1], [t2, t3]] chosen without a saddle point.  Costs of players (x, y) stacked."""

    def costs(phi, th):
        M = th.reshape(2, 2)
        x, y = phi[0], phi[1]
        v = x @ M @ y
        return torch.stack([v, -v])

    return costs


def matrix_game_2x2_solution(th):
    a, b, c, d = th[0], th[1], th[2], th[3]
    den = a - b - c + d
    x1 = (d - c) / den
    y1 = (d - b) / den
    return torch.stack([torch.stack([x1, 1 - x1]), torch.stack([y1, 1 - y1])])
