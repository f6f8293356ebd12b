"""The GBML family against slow references written as per-task autograd loops (float64).

The references below use no vmap, no AggregativeGame and no torch.func: every task is a Python
loop iteration, every player's gradient is ``torch.autograd.grad`` of its full cost (eq. 12) with
respect to its own parameters, with ``create_graph=True`` for second order.
"""
import math

import pytest
import torch

import implicit_nash as inn
from implicit_nash.meta import CAVIA, FOMAML, IMAML, MAML, TRMAML, MetaSGD
from implicit_nash.penalties import CentroidPenalty, ProximalPenalty, RobustPenalty
from implicit_nash.tasks import SinusoidTasks, mlp

B, K, Q = 4, 5, 6


# ------------------------------------------------------------------ the reference, by hand
def forward(params, x):
    """The mlp([1 + c, 6, 1], 'tanh') network written out (independent of functional_call)."""
    h = torch.tanh(x @ params["0.weight"].T + params["0.bias"])
    return h @ params["2.weight"].T + params["2.bias"]


def sqd(a, b):
    return sum(((a[k] - b[k]) ** 2).sum() for k in a)


def ref_penalty(kind, pen, phis, anchor, i):
    if kind is None:
        return 0.0
    if kind == "centroid":
        n = len(phis)
        centroid = {k: sum(p[k] for p in phis) / n for k in anchor}
        return pen.scale(n) * sqd(anchor, centroid)
    if kind == "robust":
        r = pen.robustness
        return pen.weight * len(phis) * sqd(phis[i], anchor) ** r / (pen.C + sum(sqd(p, anchor) ** r for p in phis))
    if kind == "proximal":
        return 0.5 * pen.lam * sqd(phis[i], anchor)
    raise AssertionError(kind)


def reference_losses(theta, batch, *, steps, kind=None, pen=None, lrs=None, cavia=False, first_order=False):
    """Per-task query losses after ``steps`` simultaneous (Jacobi) gradient steps of the game."""
    params = theta["params"]
    if cavia:
        anchor = {"context": torch.zeros(2)}
        phis = [{"context": torch.zeros(2, requires_grad=True)} for _ in range(B)]

        def predict(phi, x):
            return forward(params, torch.cat([x, phi["context"].expand(x.shape[0], 2)], -1))
    else:
        anchor = params
        # a distinct node per player, so that grad w.r.t. phis[i] counts player i's own path only
        phis = [{k: v.clone() for k, v in params.items()} for _ in range(B)]
        if first_order:
            anchor = {k: v.detach() for k, v in params.items()}
            phis = [{k: v.detach().clone().requires_grad_(True) for k, v in params.items()} for _ in range(B)]

        def predict(phi, x):
            return forward(phi, x)
    for _ in range(steps):
        new = []
        for i in range(B):
            f_i = ((predict(phis[i], batch["x_support"][i]) - batch["y_support"][i]) ** 2).mean()
            f_i = f_i + ref_penalty(kind, pen, phis, anchor, i)
            names = list(phis[i])
            grads = torch.autograd.grad(f_i, [phis[i][k] for k in names], create_graph=not first_order)
            lr = lambda k: 0.1 if lrs is None else lrs[k]
            new.append({k: phis[i][k] - lr(k) * g for k, g in zip(names, grads)})
        phis = new
    if first_order:
        phis = [{k: v.detach().requires_grad_(True) for k, v in p.items()} for p in phis]
    losses = [((predict(phis[i], batch["x_query"][i]) - batch["y_query"][i]) ** 2).mean() for i in range(B)]
    return torch.stack(losses), phis


def leaves(theta):
    return [v for d in theta.values() for v in d.values()]


@pytest.fixture
def batch(gen):
    x = 10 * torch.rand(B, K + Q, 1, generator=gen) - 5
    amp = 0.5 + 2 * torch.rand(B, 1, 1, generator=gen)
    y = amp * torch.sin(x + 1.0)
    return {"x_support": x[:, :K], "y_support": y[:, :K], "x_query": x[:, K:], "y_query": y[:, K:],
            "task_ids": torch.tensor([3, 7, 3, 1])}


def setup(algo, seed=0):
    torch.manual_seed(seed)
    model = mlp([1 + algo.input_extra(), 6, 1], "tanh")
    return model, algo.init(model)


PENALTIES = {
    None: None,
    "centroid": CentroidPenalty(weight=0.3, num_tasks=10, inner_lr=0.5),
    "robust1": RobustPenalty(weight=0.2, robustness=1.0, C=1e-3),
    "robust2": RobustPenalty(weight=0.2, robustness=2.0, C=1e-4),
}


def _kind(name):
    return None if name is None else name.rstrip("12")


# ------------------------------------------------------------------ meta-gradients
@pytest.mark.parametrize("pen_name", list(PENALTIES))
def test_maml_meta_gradient_equals_per_task_reference(pen_name, batch):
    pen = PENALTIES[pen_name]
    algo = MAML(inner_steps=3, inner_lr=0.1, penalty=pen)
    model, theta = setup(algo)
    losses = algo.task_losses(model, theta, batch)
    ref, _ = reference_losses(theta, batch, steps=3, kind=_kind(pen_name), pen=pen)
    assert torch.allclose(losses, ref, rtol=1e-10, atol=1e-12)
    g = torch.autograd.grad(algo.outer_loss(losses, batch, {}), leaves(theta))
    g_ref = torch.autograd.grad(ref.mean(), leaves(theta))
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    assert any(float(a.abs().max()) > 1e-3 for a in g)  # not a trivially zero gradient


@pytest.mark.parametrize("pen_name", [None, "centroid", "robust2"])
def test_fomaml_meta_gradient_is_the_mean_query_gradient_at_the_adapted_parameters(pen_name, batch):
    pen = PENALTIES[pen_name]
    algo = FOMAML(inner_steps=3, inner_lr=0.1, penalty=pen)
    model, theta = setup(algo)
    losses = algo.task_losses(model, theta, batch)
    g = torch.autograd.grad(losses.mean(), leaves(theta))
    ref, phis = reference_losses(theta, batch, steps=3, kind=_kind(pen_name), pen=pen, first_order=True)
    names = list(theta["params"])
    per_task = [torch.autograd.grad(ref[i] / B, [phis[i][k] for k in names]) for i in range(B)]
    for j, a in enumerate(g):
        assert torch.allclose(a, sum(t[j] for t in per_task), rtol=1e-9, atol=1e-12)
    # and it differs from the second-order gradient
    so = torch.autograd.grad(MAML(inner_steps=3, inner_lr=0.1, penalty=pen).task_losses(model, theta, batch).mean(),
                             leaves(theta))
    assert max(float((a - b).abs().max()) for a, b in zip(g, so)) > 1e-6


@pytest.mark.parametrize("pen_name", [None, "centroid", "robust1"])
def test_metasgd_meta_gradient_equals_reference_including_the_learned_rates(pen_name, batch):
    pen = PENALTIES[pen_name]
    algo = MetaSGD(inner_steps=2, inner_lr=0.1, penalty=pen)
    model, theta = setup(algo)
    with torch.no_grad():  # distinct rates per parameter, so that a mix-up would show
        for v in theta["lr"].values():
            v.mul_(1 + 0.5 * torch.rand(v.shape))
    losses = algo.task_losses(model, theta, batch)
    ref, _ = reference_losses(theta, batch, steps=2, kind=_kind(pen_name), pen=pen, lrs=theta["lr"])
    g = torch.autograd.grad(losses.mean(), leaves(theta))
    g_ref = torch.autograd.grad(ref.mean(), leaves(theta))
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    n_params = len(theta["params"])
    assert all(float(t.abs().max()) > 0 for t in g[n_params:])  # the learned rates get a gradient


@pytest.mark.parametrize("pen_name", [None, "robust1"])
def test_metasgd_lr_clip_adapts_with_the_clamped_rates(pen_name, batch):
    """``lr_clip=(lo, hi)``: the inner steps use the learned rates clamped to [lo, hi] (the reference
    with the clamped rates), the rates outside get no gradient, those inside the reference's."""
    pen = PENALTIES[pen_name]
    algo = MetaSGD(inner_steps=2, inner_lr=0.1, penalty=pen, lr_clip=(0.0, 0.12))
    model, theta = setup(algo)
    with torch.no_grad():  # rates below 0, inside and above 0.12
        for v in theta["lr"].values():
            v.copy_(0.3 * torch.rand(v.shape) - 0.1)
    clamped = {k: v.detach().clamp(0.0, 0.12).requires_grad_(True) for k, v in theta["lr"].items()}
    losses = algo.task_losses(model, theta, batch)
    ref, _ = reference_losses(theta, batch, steps=2, kind=_kind(pen_name), pen=pen, lrs=clamped)
    assert torch.allclose(losses, ref, rtol=1e-10, atol=1e-12)
    unclipped = MetaSGD(inner_steps=2, inner_lr=0.1, penalty=pen).task_losses(model, theta, batch)
    assert float((unclipped - losses).detach().abs().max()) > 1e-6  # the clamp changed the adaptation
    g = torch.autograd.grad(losses.mean(), list(theta["lr"].values()))
    g_ref = torch.autograd.grad(ref.mean(), list(clamped.values()))
    for (k, v), a, b in zip(theta["lr"].items(), g, g_ref):
        inside = (v > 0.0) & (v < 0.12)
        assert torch.all(a[~inside] == 0)
        assert torch.allclose(a[inside], b[inside], rtol=1e-9, atol=1e-12)
    assert any(bool((a != 0).any()) for a in g)
    with pytest.raises(ValueError, match="lr_clip must be"):
        MetaSGD(lr_clip=(0.1, 0.0))


@pytest.mark.parametrize("pen_name", [None, "centroid", "robust2"])
def test_cavia_meta_gradient_equals_reference(pen_name, batch):
    pen = PENALTIES[pen_name]
    algo = CAVIA(inner_steps=3, inner_lr=0.1, penalty=pen, context_dim=2)
    model, theta = setup(algo)
    losses = algo.task_losses(model, theta, batch)
    ref, _ = reference_losses(theta, batch, steps=3, kind=_kind(pen_name), pen=pen, cavia=True)
    assert torch.allclose(losses, ref, rtol=1e-10, atol=1e-12)
    g = torch.autograd.grad(losses.mean(), leaves(theta))
    g_ref = torch.autograd.grad(ref.mean(), leaves(theta))
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_trmaml_outer_loss_and_task_probabilities(batch):
    algo = TRMAML(inner_steps=2, inner_lr=0.1, task_lr=0.05)
    model, theta = setup(algo)
    N = 10
    state = algo.init_state(N, theta["params"]["0.bias"])
    probs = torch.rand(N) + 0.1
    state = {"task_probs": probs / probs.sum()}
    losses = algo.task_losses(model, theta, batch)
    outer = algo.outer_loss(losses, batch, state)
    ref, _ = reference_losses(theta, batch, steps=2)
    w = state["task_probs"][batch["task_ids"]] * N / B
    assert torch.allclose(outer, (w * ref).sum(), rtol=1e-12)
    g = torch.autograd.grad(outer, leaves(theta))
    g_ref = torch.autograd.grad((w * ref).sum(), leaves(theta))
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    # projected ascent: p + lr * g with g_j = N/B * sum of the losses of the tasks drawn as j
    new = algo.update_state(state, losses, batch)["task_probs"]
    gj = torch.zeros(N)
    for b, j in enumerate(batch["task_ids"].tolist()):
        gj[j] += losses[b].item() * N / B
    assert torch.allclose(new, simplex_projection_by_sorting(state["task_probs"] + 0.05 * gj), atol=1e-15)


def simplex_projection_by_sorting(v):
    """Euclidean projection onto the probability simplex (Held et al. 1974; Duchi et al. 2008)."""
    u = torch.sort(v, descending=True).values
    css = torch.cumsum(u, 0)
    j = torch.arange(1, v.numel() + 1, dtype=v.dtype)
    rho = int(torch.nonzero(u - (css - 1) / j > 0).max())
    tau = (css[rho] - 1) / (rho + 1)
    return torch.clamp(v - tau, min=0)


@pytest.mark.parametrize("scale", [0.01, 1.0, 30.0])
def test_trmaml_simplex_projection_is_exact(scale, gen):
    algo = TRMAML(task_lr=1.0)
    N = 12
    for _ in range(20):
        p = torch.rand(N, generator=gen)
        p = p / p.sum()
        losses = scale * torch.rand(5, generator=gen)
        ids = torch.randint(0, N, (5,), generator=gen)
        new = algo.update_state({"task_probs": p}, losses, {"task_ids": ids})["task_probs"]
        g = torch.zeros(N).index_add_(0, ids, losses) * N / 5
        expected = simplex_projection_by_sorting(p + g)
        v = p + g
        tol = 1e-14 * (1 + float(v.abs().max()))  # rounding of v - tau scales with |v|
        assert torch.allclose(new, expected, atol=tol)
        assert abs(float(new.sum()) - 1) < N * tol and float(new.min()) >= 0
        # KKT: the projection of v is max(v - tau, 0) with the same tau on the support
        support = new > 0
        taus = (v - new)[support]
        assert torch.allclose(taus, taus[0].expand_as(taus), atol=10 * tol)
        assert bool((v[~support] <= taus[0] + 10 * tol).all())


def imaml_dense_meta_gradient(algo, model, theta, batch):
    """iMAML's formula: mean_i (I + H_i / lam)^{-1} grad L_query,i(phi_i*), dense Hessians."""
    phi = algo.adapt(model, theta, batch["x_support"], batch["y_support"], mode="implicit")
    names = list(theta["params"])
    shapes = [theta["params"][k].shape for k in names]
    sizes = [s.numel() for s in shapes]

    def unflat(v):
        return {k: t.reshape(s) for k, t, s in zip(names, torch.split(v, sizes), shapes)}

    total = 0
    for i in range(B):
        flat = torch.cat([phi[k][i].detach().reshape(-1) for k in names])
        support = lambda v: ((forward(unflat(v), batch["x_support"][i]) - batch["y_support"][i]) ** 2).mean()
        query = lambda v: ((forward(unflat(v), batch["x_query"][i]) - batch["y_query"][i]) ** 2).mean()
        H = torch.autograd.functional.hessian(support, flat)
        gq = torch.autograd.functional.jacobian(query, flat)
        total = total + torch.linalg.solve(torch.eye(flat.numel()) + H / algo.lam, gq) / B
    return total


def test_imaml_implicit_meta_gradient_equals_the_dense_formula(batch):
    algo = IMAML(lam=5.0, inner_lr=0.1, solver=inn.PRGD(rtol=1e-12, max_steps=20000))
    model, theta = setup(algo)
    losses = algo.task_losses(model, theta, batch)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(losses.mean(), leaves(theta))])
    expected = imaml_dense_meta_gradient(algo, model, theta, batch)
    assert torch.allclose(g, expected, rtol=1e-7, atol=1e-10)


def test_imaml_meta_gradient_with_a_compiled_backward_equals_the_dense_formula(batch):
    """The implicit meta-gradient with CG(compiled=True) (issue 16) in the trainer's algorithm: the
    products of the whole batch's Jacobian traced once and reused (aot_eager: no C++ compiler)."""
    seen = []

    class Seen(inn.CG):
        def solve(self, *a, **k):
            x, info = super().solve(*a, **k)
            seen.append(info.message)
            return x, info

    algo = IMAML(lam=5.0, inner_lr=0.1, solver=inn.PRGD(rtol=1e-12, max_steps=20000),
                 linear_solver=Seen(rtol=1e-12, compiled=True, backend="aot_eager"))
    model, theta = setup(algo)
    losses = algo.task_losses(model, theta, batch)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(losses.mean(), leaves(theta))])
    assert seen and all("compiled in chunks of 5" in m for m in seen), seen
    expected = imaml_dense_meta_gradient(algo, model, theta, batch)
    assert torch.allclose(g, expected, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("pen_name", [None, "centroid", "robust_mild"])
def test_implicit_and_unrolled_agree_on_a_long_contractive_inner_loop(pen_name, batch):
    """Proximal inner problem (+ penalty): 1500 unrolled steps reach the equilibrium, and the
    unrolled meta-gradient converges to the implicit one.

    The robust penalty is not monotone in general (a player's own p_R, ``x/(c + x)`` of its squared
    distance, is concave once that distance exceeds a third of the others'), so it gets a weight
    small enough for the proximal term to keep the game strongly monotone.
    """
    pen = RobustPenalty(weight=0.02, robustness=1.0, C=1e-2) if pen_name == "robust_mild" else PENALTIES[pen_name]
    implicit = IMAML(lam=5.0, penalty=pen, solver=inn.PRGD(rtol=1e-12, max_steps=20000))
    unrolled = IMAML(lam=5.0, penalty=pen, meta_gradient="unrolled", inner_steps=1500, inner_lr=0.1)
    model, theta = setup(implicit)
    g_imp = torch.autograd.grad(implicit.task_losses(model, theta, batch).mean(), leaves(theta))
    g_unr = torch.autograd.grad(unrolled.task_losses(model, theta, batch).mean(), leaves(theta))
    for a, b in zip(g_imp, g_unr):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9)


def test_cavia_implicit_mode_includes_the_loss_term_of_q(batch):
    """CAVIA's loss depends on theta (the weights): the implicit gradient must match finite differences."""
    algo = CAVIA(context_dim=2, penalty=ProximalPenalty(lam=3.0), meta_gradient="implicit",
                 solver=inn.PRGD(rtol=1e-13, max_steps=50000))
    model, theta = setup(algo)
    g = torch.autograd.grad(algo.task_losses(model, theta, batch).mean(), leaves(theta))
    w = theta["params"]["2.weight"]
    direction = torch.randn(w.shape, generator=torch.Generator().manual_seed(3))
    eps = 1e-5

    def at(shift):
        shifted = {"params": {**theta["params"], "2.weight": (w + shift * direction).detach()}}
        with torch.no_grad():
            return algo.task_losses(model, shifted, batch).mean()

    fd = (at(eps) - at(-eps)) / (2 * eps)
    assert math.isclose(float((g[2] * direction).sum()), float(fd), rel_tol=1e-6, abs_tol=1e-9)


# ------------------------------------------------------------------ penalties
@pytest.mark.parametrize("pen_name", ["centroid", "robust1", "robust2"])
def test_penalty_pseudo_gradient_equals_per_player_autograd(pen_name, batch, gen):
    pen = PENALTIES[pen_name]
    algo = MAML(penalty=pen)
    model, theta = setup(algo)
    phi = {k: v.detach() + 0.3 * torch.randn(B, *v.shape, generator=gen) for k, v in theta["params"].items()}
    game = algo.game(model, theta, batch["x_support"], batch["y_support"])
    F = game.pseudo_gradient(phi, theta)
    players = [{k: phi[k][i].clone().requires_grad_(True) for k in phi} for i in range(B)]
    for i in range(B):
        f_i = ((forward(players[i], batch["x_support"][i]) - batch["y_support"][i]) ** 2).mean()
        f_i = f_i + ref_penalty(_kind(pen_name), pen, players, theta["params"], i)
        grads = torch.autograd.grad(f_i, [players[i][k] for k in phi])
        for k, gk in zip(phi, grads):
            assert torch.allclose(F[k][i], gk, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("pen", [PENALTIES["centroid"], PENALTIES["robust1"], PENALTIES["robust2"],
                                 RobustPenalty(weight=0.3, robustness=3.0, C=1e-3),
                                 RobustPenalty(weight=0.3, robustness=1.5, C=1e-3),
                                 PENALTIES["centroid"] + ProximalPenalty(lam=2.0) + PENALTIES["robust2"]],
                         ids=["centroid", "robust1", "robust2", "robust3", "robust1.5", "sum"])
@pytest.mark.parametrize("at_theta", [False, True])
def test_penalty_fast_path_equals_autograd_path_to_second_order(pen, at_theta, batch, gen):
    """The closed-form pseudo-gradients equal autograd through contribution/value, and so do their
    derivatives (what the unrolled and implicit meta-gradients differentiate), also at phi = theta."""
    fast, slow = MAML(penalty=pen), MAML(penalty=pen, fast_penalty=False)
    model, theta = setup(fast)
    shift = 0.0 if at_theta else 0.3
    phi = {k: (v.detach() + shift * torch.randn(B, *v.shape, generator=gen)).requires_grad_(True)
           for k, v in theta["params"].items()}
    F1 = fast.game(model, theta, batch["x_support"], batch["y_support"]).pseudo_gradient(phi, theta)
    F2 = slow.game(model, theta, batch["x_support"], batch["y_support"]).pseudo_gradient(phi, theta)
    assert fast.game(model, theta, batch["x_support"], batch["y_support"]).coupling_gradient is not None
    w = {k: torch.randn(F1[k].shape, generator=gen) for k in F1}
    s1 = sum((F1[k] * w[k]).sum() for k in F1)
    s2 = sum((F2[k] * w[k]).sum() for k in F2)
    assert torch.allclose(s1, s2, rtol=1e-12)
    inputs = list(phi.values()) + leaves(theta)
    g1 = torch.autograd.grad(s1, inputs)
    g2 = torch.autograd.grad(s2, inputs)
    for a, b in zip(g1, g2):
        assert torch.isfinite(a).all()
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_penalty_values_and_scale():
    pen = CentroidPenalty(weight=0.1, num_tasks=100, inner_lr=0.001)
    assert math.isclose(pen.scale(25), 0.1 * (25 / (0.001 * 100)) ** 2)
    assert CentroidPenalty(weight=0.1).scale(25) == 0.1
    phi = {"w": torch.tensor([1.0, 2.0])}
    anchor = {"w": torch.tensor([0.0, 0.0])}
    s = {"w": torch.tensor([2.0, 2.0])}  # two players: centroid (1, 1)
    assert math.isclose(float(pen.value(phi, anchor, s, 2)), pen.scale(2) * 2.0)
    rob = RobustPenalty(weight=0.5, robustness=2.0, C=1e-8)
    a = float(rob.contribution(phi, anchor))
    assert math.isclose(a, 25.0)
    assert math.isclose(float(rob.value(phi, anchor, torch.tensor(a + 7.0), 2)), 0.5 * 2 * 25 / (1e-8 + 32))
    both = pen + rob + ProximalPenalty(lam=2.0)
    assert both.coupled and not both.symmetric and len(both.terms) == 3


def test_robust_penalty_gradient_is_finite_at_phi_equal_theta(batch):
    """Algorithm 2 starts at phi_i = theta, where |theta - phi|^(2r) has a zero gradient for r >= 1."""
    for r in (1.0, 2.0):
        algo = MAML(penalty=RobustPenalty(weight=1.0, robustness=r, C=1e-12))
        model, theta = setup(algo)
        plain = MAML()
        start = algo._start(theta, B)
        F = algo.game(model, theta, batch["x_support"], batch["y_support"]).pseudo_gradient(start, theta)
        F0 = plain.game(model, theta, batch["x_support"], batch["y_support"]).pseudo_gradient(start, theta)
        for k in F:
            assert torch.isfinite(F[k]).all() and torch.allclose(F[k], F0[k], atol=1e-15)


@pytest.mark.parametrize("bad, match", [
    (lambda: CentroidPenalty(weight=-1.0), "weight"),
    (lambda: RobustPenalty(weight=0.1, robustness=0.5), "robustness must be >= 1"),
    (lambda: RobustPenalty(weight=0.1, C=0.0), "C must be"),
    (lambda: ProximalPenalty(lam=0.0), "lam"),
    (lambda: MAML(inner_steps=0), "inner_steps"),
    (lambda: MAML(inner_lr=-0.1), "inner_lr"),
    (lambda: MAML(meta_gradient="second"), "meta_gradient"),
    (lambda: MAML(penalty="centroid"), "penalty must be"),
    (lambda: CAVIA(context_dim=0), "context_dim"),
    (lambda: TRMAML(task_lr=0.0), "task_lr"),
    (lambda: IMAML(lam=-1.0), "lam"),
])
def test_bad_hyperparameters_are_rejected(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        bad()


@pytest.mark.parametrize("algo", [MAML(inner_lr=0.1), FOMAML(inner_lr=0.1), MetaSGD(inner_lr=0.1),
                                  CAVIA(inner_lr=0.1, context_dim=2), TRMAML(inner_lr=0.1),
                                  IMAML(inner_lr=0.1, lam=5.0, solver=inn.PRGD(max_steps=5000))],
                         ids=lambda a: a.name)
def test_contract_every_algorithm(algo, batch):
    """Shared signature; float32 works; inner_steps and inner_lr have an effect; gradients flow."""
    model, theta = setup(algo)
    losses = algo.task_losses(model, theta, batch)
    assert losses.shape == (B,) and losses.dtype == torch.float64
    g = torch.autograd.grad(algo.outer_loss(losses, batch, algo.init_state(10, losses)),
                            leaves(theta), allow_unused=True)
    assert any(t is not None and float(t.abs().max()) > 0 for t in g)
    import dataclasses
    for field, new in (("inner_steps", 5), ("inner_lr", 0.05)):
        if algo.meta_gradient == "implicit" and field in ("inner_steps", "inner_lr"):
            continue  # the equilibrium does not depend on the forward's step count or rate
        other = dataclasses.replace(algo, **{field: new})
        # re-initialised from the same model: Meta-SGD's inner_lr is its rates' initial value
        assert not torch.allclose(other.task_losses(model, other.init(model), batch), losses), field
    model32 = mlp([1 + algo.input_extra(), 6, 1], "tanh").float()
    theta32 = algo.init(model32)
    b32 = {k: v.float() if v.is_floating_point() else v for k, v in batch.items()}
    assert algo.task_losses(model32, theta32, b32).dtype == torch.float32


# ------------------------------------------------------------------ sinusoid tasks
def test_sinusoid_intervals_and_sampling():
    from implicit_nash.tasks.sinusoid import interval_statistics, test_intervals, train_intervals
    tr = train_intervals()
    assert tr.shape == (100, 2) and torch.allclose(tr[:, 1] - tr[:, 0], torch.full((100,), 0.01))
    assert math.isclose(float(tr[0, 0]), 0.1) and math.isclose(float(tr[94, 1]), 1.05)
    assert math.isclose(float(tr[95, 0]), 4.95) and math.isclose(float(tr[99, 1]), 5.0)
    te = test_intervals()
    assert te.shape == (490, 2) and math.isclose(float(te[-1, 1]), 5.0)
    tasks = SinusoidTasks()
    g = torch.Generator().manual_seed(0)
    b = tasks.sample(4000, g, dtype=torch.float64)
    lo, hi = tr[b["task_ids"], 0], tr[b["task_ids"], 1]
    assert bool(((b["amplitude"] >= lo) & (b["amplitude"] <= hi)).all())
    large = float((b["task_ids"] >= 95).double().mean())
    assert 0.03 < large < 0.07  # 5 of 100 sub-intervals: large amplitudes are rare
    assert b["x_support"].shape == (4000, 5, 1) and float(b["x_support"].abs().max()) <= 5.0
    # y = a sin(x + b) for some b in [0, pi]: recover b from two points of one task
    test = tasks.test_set(num_tasks=980, seed=1, dtype=torch.float64)
    assert torch.equal(torch.bincount(test["interval_ids"]), torch.full((490,), 2))
    assert torch.equal(test["x_query"], tasks.test_set(num_tasks=980, seed=1, dtype=torch.float64)["x_query"])
    per_task = torch.arange(980, dtype=torch.float64)
    stats = interval_statistics(per_task, test["interval_ids"], 490)
    assert math.isclose(stats["mean"], float(per_task.mean())) and math.isclose(stats["worst"], (489 + 979) / 2)


@pytest.mark.parametrize("pen_name", ["centroid", "robust1", "robust2"])
@pytest.mark.parametrize("algo_cls", [MAML, MetaSGD, CAVIA])
def test_skipping_the_penalty_at_the_anchor_changes_nothing(pen_name, algo_cls, batch):
    """A penalty that ``vanishes_at_anchor`` is skipped at the first inner step (every player starts at
    the anchor); the losses and second-order meta-gradients equal those with the penalty evaluated."""
    pen = PENALTIES[pen_name]
    assert pen.vanishes_at_anchor

    class Evaluated(type(pen)):  # the same penalty, not declared to vanish: evaluated at every step
        vanishes_at_anchor = False

    kwargs = {"context_dim": 2} if algo_cls is CAVIA else {}
    skip = algo_cls(inner_steps=3, inner_lr=0.1, penalty=pen, **kwargs)
    full = algo_cls(inner_steps=3, inner_lr=0.1, penalty=Evaluated(**vars(pen)), **kwargs)
    model, theta = setup(skip)
    l1, l2 = skip.task_losses(model, theta, batch), full.task_losses(model, theta, batch)
    assert torch.allclose(l1, l2, rtol=1e-12, atol=1e-14)
    g1 = torch.autograd.grad(l1.mean(), leaves(theta))
    g2 = torch.autograd.grad(l2.mean(), leaves(theta))
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)


# ------------------------------------------------------------------ iMAML's Newton-Krylov inner solver
def _grad(algo, model, theta, batch):
    return torch.cat([g.reshape(-1) for g in
                      torch.autograd.grad(algo.task_losses(model, theta, batch).mean(), leaves(theta))])


def test_imaml_newton_krylov_meta_gradient_equals_the_dense_formula(batch):
    from implicit_nash.meta.inner import NewtonKrylov
    algo = IMAML(lam=5.0, newton=NewtonKrylov(rtol=1e-12), linear_solver=inn.GMRES(rtol=1e-12))
    model, theta = setup(algo)
    g = _grad(algo, model, theta, batch)
    assert torch.allclose(g, imaml_dense_meta_gradient(algo, model, theta, batch), rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("pen_name", [None, "centroid", "robust_mild"])
def test_imaml_residual_by_plain_autograd_equals_the_pseudo_gradient_to_second_order(pen_name, batch, monkeypatch):
    """The layer's residual (and the coupled Newton solves' F) is the task losses' gradient by plain
    autograd plus the penalties' closed form (cheaper than torch.func's); its meta-gradient and a
    second-order quantity (the gradient of the squared meta-gradient norm, which differentiates the
    backward) equal those with game.pseudo_gradient."""
    from implicit_nash.meta.inner import NewtonKrylov
    pen = RobustPenalty(weight=0.02, robustness=1.0, C=1e-2) if pen_name == "robust_mild" else PENALTIES[pen_name]
    algo = IMAML(lam=5.0, penalty=pen, newton=NewtonKrylov(rtol=1e-12), linear_solver=inn.GMRES(rtol=1e-12))
    model, theta = setup(algo)

    def second(a):
        g = torch.autograd.grad(a.task_losses(model, theta, batch).mean(), leaves(theta), create_graph=True)
        gg = torch.autograd.grad(sum((x ** 2).sum() for x in g), leaves(theta))
        return torch.cat([x.reshape(-1) for x in g]).detach(), torch.cat([x.reshape(-1) for x in gg])

    fast = second(algo)
    monkeypatch.setattr(IMAML, "_residual", lambda self, game, losses, penalty, B: game.pseudo_gradient)
    slow = second(algo)
    assert torch.allclose(fast[0], slow[0], rtol=1e-9, atol=1e-12)
    assert torch.allclose(fast[1], slow[1], rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("pen_name", ["centroid", "robust_mild"])
def test_imaml_newton_krylov_and_prgd_agree_with_a_penalty(pen_name, batch):
    from implicit_nash.meta.inner import NewtonKrylov
    pen = RobustPenalty(weight=0.02, robustness=1.0, C=1e-2) if pen_name == "robust_mild" else PENALTIES[pen_name]
    newton = IMAML(lam=5.0, penalty=pen, newton=NewtonKrylov(rtol=1e-12), linear_solver=inn.GMRES(rtol=1e-12))
    prgd = IMAML(lam=5.0, penalty=pen, solver=inn.PRGD(rtol=1e-12, max_steps=20000),
                 linear_solver=inn.GMRES(rtol=1e-12))
    model, theta = setup(newton)
    assert torch.allclose(_grad(newton, model, theta, batch), _grad(prgd, model, theta, batch), rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("pen", [PENALTIES["centroid"], RobustPenalty(weight=0.2, robustness=1.0, C=0.5),
                                 RobustPenalty(weight=0.2, robustness=2.0, C=0.5),
                                 RobustPenalty(weight=0.2, robustness=1.5, C=0.5)])
def test_closed_form_coupling_equals_the_penalty_and_its_jacobian(pen):
    """The Nash penalty's closed form for the coupled Newton solve: its gradient is the penalty's
    pseudo-gradient, its product is the dense Jacobian's (also at the anchor, where Newton starts),
    and the centroid potential's gradient is the pseudo-gradient."""
    from implicit_nash.meta.imaml import closed_form_coupling
    gen = torch.Generator().manual_seed(3)
    b, d = 4, 5
    a = torch.randn(d, generator=gen, dtype=torch.float64)
    c = closed_form_coupling(pen, a, b)

    def pg(z):
        return pen.pseudo_gradient({"w": z.reshape(b, d)}, {"w": a}, b)["w"].reshape(-1)

    v = torch.randn(b * d, generator=gen, dtype=torch.float64)
    for z in (torch.randn(b * d, generator=gen, dtype=torch.float64), a.repeat(b)):
        J = torch.autograd.functional.jacobian(pg, z)
        assert torch.allclose(c.gradient(z), pg(z), rtol=1e-12, atol=1e-14)
        assert torch.allclose(c.jvp(z, v), J @ v, rtol=1e-10, atol=1e-12)
        if isinstance(pen, CentroidPenalty):
            assert torch.allclose(torch.autograd.functional.jacobian(c.value, z), pg(z), rtol=1e-12, atol=1e-14)
        else:
            assert c.value is None  # p_R makes no potential game
    with pytest.raises(TypeError, match="no closed form"):
        closed_form_coupling(ProximalPenalty(lam=1.0), a, b)


def coupled_dense_meta_gradient(algo, model, theta, batch):
    """-Q^T P^{-T} grad of the mean query loss, with P = dF/dphi and Q = dF/dtheta dense Jacobians of
    the whole (coupled) inner game's pseudo-gradient F at the algorithm's solution."""
    phi = algo.adapt(model, theta, batch["x_support"], batch["y_support"], mode="implicit")
    game = algo.game(model, theta, batch["x_support"], batch["y_support"])
    names = list(theta["params"])
    shapes = [theta["params"][k].shape for k in names]

    def tree(v, lead=()):
        out, i = {}, 0
        for k, s in zip(names, shapes):
            n = math.prod(lead) * s.numel()
            out[k] = v[i:i + n].reshape(*lead, *s)
            i += n
        return out

    def flat(t, lead):  # leaf-major, as tree() reads it
        return torch.cat([t[k].reshape(-1) for k in names])

    z = flat({k: v.detach() for k, v in phi.items()}, B)
    th = flat({k: v.detach() for k, v in theta["params"].items()}, ())

    def F(zz, tt):
        return flat(game.pseudo_gradient(tree(zz, (B,)), {"params": tree(tt)}), B)

    P, Qm = torch.autograd.functional.jacobian(F, (z, th))

    def query(zz):
        p = tree(zz, (B,))
        return sum(((forward({k: p[k][i] for k in names}, batch["x_query"][i]) - batch["y_query"][i]) ** 2).mean()
                   for i in range(B)) / B

    return -Qm.T @ torch.linalg.solve(P.T, torch.autograd.functional.jacobian(query, z))


@pytest.mark.parametrize("pen_name", ["centroid", "robust_mild", "robust2"])
def test_nash_imaml_closed_form_newton_meta_gradient_equals_the_dense_formula(pen_name, batch, monkeypatch):
    """Nash-iMAML's coupled Newton solve with the penalty in closed form (to tolerance, float64):
    its meta-gradient is the dense -Q^T P^{-T} g of the coupled game, and (where that path converges:
    not for robust2 here, whose F-path stalls at a residual of 5.2) the same as the solve on F with
    double-backward products (the path without a closed form). (robust1 is left out: on this batch
    both paths stall at a residual of 2.6, a stationary point of |F| that is no root.)"""
    from implicit_nash.meta.inner import NewtonKrylov
    pen = RobustPenalty(weight=0.02, robustness=1.0, C=1e-2) if pen_name == "robust_mild" else PENALTIES[pen_name]
    algo = IMAML(lam=5.0, penalty=pen, newton=NewtonKrylov(rtol=1e-12),
                 linear_solver=inn.GMRES(rtol=1e-12))
    model, theta = setup(algo)
    g = _grad(algo, model, theta, batch)
    assert torch.allclose(g, coupled_dense_meta_gradient(algo, model, theta, batch), rtol=1e-7, atol=1e-10)
    if pen_name != "robust2":
        monkeypatch.setattr(IMAML, "_coupling", lambda self, B: None)
        assert torch.allclose(g, _grad(algo, model, theta, batch), rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("pen_name", ["centroid", "robust_mild"])
def test_nash_imaml_budgeted_error_shrinks_with_the_budget(pen_name, batch):
    import warnings
    pen = RobustPenalty(weight=0.02, robustness=1.0, C=1e-2) if pen_name == "robust_mild" else PENALTIES[pen_name]
    exact = IMAML(lam=5.0, penalty=pen, linear_solver=inn.GMRES(rtol=1e-12))
    model, theta = setup(exact)
    g_star = _grad(exact, model, theta, batch)
    errors = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", inn.ConvergenceWarning)
        for budget, cg in ((2, 1), (2, 3), (8, 40)):
            algo = IMAML(lam=5.0, penalty=pen, budget=budget, cg_budget=cg)
            errors.append(float((_grad(algo, model, theta, batch) - g_star).norm() / g_star.norm()))
    assert errors[0] > 1e-3 and errors[0] > errors[1] > errors[2] and errors[2] < 1e-8, errors


def test_imaml_budgeted_error_shrinks_with_the_budget_and_does_not_warn(batch):
    import warnings
    exact = IMAML(lam=5.0, linear_solver=inn.GMRES(rtol=1e-12))
    model, theta = setup(exact)
    g_star = _grad(exact, model, theta, batch)
    errors = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", inn.ConvergenceWarning)
        for budget, cg in ((1, 1), (2, 3), (6, 30)):
            algo = IMAML(lam=5.0, budget=budget, cg_budget=cg)
            assert algo.budgeted and not algo.reference().budgeted
            errors.append(float((_grad(algo, model, theta, batch) - g_star).norm() / g_star.norm()))
    assert errors[0] > 1e-3 and errors[0] > errors[1] > errors[2] and errors[2] < 1e-8


def test_newton_krylov_solves_monotone_linear_systems_and_stops_at_a_kink():
    from implicit_nash.meta.inner import NewtonKrylov, newton_krylov
    gen = torch.Generator().manual_seed(0)
    M = torch.randn(20, 20, generator=gen, dtype=torch.float64)
    b = torch.randn(20, generator=gen, dtype=torch.float64)
    for A, symmetric in ((M @ M.T / 20 + torch.eye(20, dtype=torch.float64), True),
                         (torch.eye(20, dtype=torch.float64) + (M - M.T) / 4, False)):
        res = newton_krylov(lambda z: A @ z - b, torch.zeros(20, dtype=torch.float64),
                            NewtonKrylov(krylov_steps=40, rtol=1e-13), symmetric=symmetric)
        assert res.status == "converged" and res.steps <= 8  # inexact Newton: superlinear
        assert torch.allclose(res.value, torch.linalg.solve(A, b), rtol=1e-10, atol=1e-12)
    # F = z + (1 if z > 0 else -1): the minimiser of |z| + z^2/2 sits on the kink, where |F| >= 1
    res = newton_krylov(lambda z: z + 2.0 * (z > 0).to(z.dtype) - 1.0, torch.ones(1, dtype=torch.float64),
                        NewtonKrylov(), symmetric=True)
    assert res.status == "stalled" and not res.converged and res.residual >= 1.0


def test_newton_krylov_with_a_coupling_solves_coupled_linear_systems():
    """Block objectives 1/2 z_i^T A_i z_i - b_i^T z_i plus a coupling M z in closed form: the
    solution is (blockdiag(A) + M)^{-1} b, with CG and a line search on the potential for a symmetric
    M (value 1/2 z^T M z), GMRES and a line search on |F| for a non-symmetric one, also after warm
    steps on the uncoupled blocks; a budget runs exactly its steps."""
    from implicit_nash.meta.inner import Coupling, NewtonKrylov, newton_krylov
    gen = torch.Generator().manual_seed(4)
    blocks, n = 3, 4
    mats = []
    for _ in range(blocks):
        M = torch.randn(n, n, generator=gen, dtype=torch.float64)
        mats.append(M @ M.T / n + torch.eye(n, dtype=torch.float64))
    A = torch.block_diag(*mats)
    b = torch.randn(blocks * n, generator=gen, dtype=torch.float64)
    C = torch.randn(blocks * n, blocks * n, generator=gen, dtype=torch.float64) / (4 * blocks * n)

    def objective(z):
        Z = z.reshape(blocks, n)
        return 0.5 * torch.einsum("bi,bij,bj->b", Z, torch.stack(mats), Z) - (Z * b.reshape(blocks, n)).sum(1)

    for M, value in ((C @ C.T, lambda z: 0.5 * z @ (C @ C.T) @ z), (C - C.T + 0.1 * C @ C.T, None)):
        coupling = Coupling(lambda z, M=M: M @ z, lambda z, v, M=M: M @ v, value)
        for warm in (0, 2):
            res = newton_krylov(None, torch.zeros(blocks * n, dtype=torch.float64),
                                NewtonKrylov(krylov_steps=blocks * n, rtol=1e-13), symmetric=value is not None,
                                blocks=blocks, objective=objective, coupling=coupling, warm=warm)
            assert res.status == "converged" and res.steps <= warm + 6
            assert torch.allclose(res.value, torch.linalg.solve(A + M, b), rtol=1e-10, atol=1e-12)
        res = newton_krylov(None, torch.zeros(blocks * n, dtype=torch.float64),
                            NewtonKrylov(max_steps=2, krylov_steps=2, budget=True), symmetric=value is not None,
                            blocks=blocks, objective=objective, coupling=coupling, warm=1)
        assert res.status == "completed" and res.steps == 3
    with pytest.raises(ValueError, match="coupling needs"):
        newton_krylov(lambda z: z, torch.zeros(2), NewtonKrylov(), symmetric=True, coupling=coupling)


def test_task_cg_solves_each_block_with_its_own_krylov_space():
    """TaskCG on a block-diagonal SPD system = one CG per block (dense solves when steps >= block
    size), in both layouts: blocks contiguous, and a pytree's leaves one after the other."""
    from implicit_nash.meta.inner import TaskCG
    gen = torch.Generator().manual_seed(2)
    blocks, sizes = 3, (2, 4)
    n = sum(sizes)
    mats = []
    for _ in range(blocks):
        M = torch.randn(n, n, generator=gen, dtype=torch.float64)
        mats.append(M @ M.T + 0.5 * torch.eye(n, dtype=torch.float64))
    A = torch.block_diag(*mats)  # task-major (contiguous blocks)
    b = torch.randn(blocks * n, generator=gen, dtype=torch.float64)
    x, info = TaskCG(blocks=blocks, steps=n).solve(A, b)
    assert info.converged and info.steps == n
    assert torch.allclose(x, torch.linalg.solve(A, b), rtol=1e-8, atol=1e-10)
    # leaf-major layout: [leaf 0 of every block, leaf 1 of every block]
    perm = torch.cat([(torch.arange(blocks)[:, None] * n + torch.arange(sizes[0])).reshape(-1),
                      (torch.arange(blocks)[:, None] * n + sizes[0] + torch.arange(sizes[1])).reshape(-1)])
    A_leaf, b_leaf = A[perm][:, perm], b[perm]
    x_leaf, _ = TaskCG(blocks=blocks, steps=n, sizes=sizes).solve(A_leaf, b_leaf)
    assert torch.allclose(x_leaf, x[perm], rtol=1e-8, atol=1e-10)
    # a short budget: each block's iterate is its own CG's (compare with one block solved alone)
    x2, info2 = TaskCG(blocks=blocks, steps=2).solve(A, b)
    alone, _ = TaskCG(blocks=1, steps=2).solve(mats[1], b[n:2 * n])
    assert torch.allclose(x2[n:2 * n], alone, rtol=1e-10, atol=1e-12)
    assert info2.converged and "fixed budget of 2 CG steps" in info2.message
    # an indefinite block stops at its non-positive curvature and keeps its iterate; the others go on
    bad = torch.block_diag(*mats[:2], -mats[2])
    x3, info3 = TaskCG(blocks=blocks, steps=n).solve(bad, b)
    assert info3.converged and torch.equal(x3[2 * n:], torch.zeros(n, dtype=torch.float64))
    assert torch.allclose(x3[:2 * n], x[:2 * n], rtol=1e-8, atol=1e-10)
    # the layer's stacked problems (groups) are blocks too; a warm start from the solution stays there
    xg, _ = TaskCG(steps=n).solve(A, b, groups=blocks)
    assert torch.allclose(xg, x, rtol=1e-8, atol=1e-10)
    xw, infow = TaskCG(steps=1).solve(A, b, x0=x)
    assert infow.matvecs == 2 and torch.allclose(xw, x, rtol=1e-8, atol=1e-10)
    # method="gmres": GMRES per block (indefinite blocks too), in both layouts, with warm starts
    N = torch.block_diag(*mats[:2], mats[2] - 3 * torch.eye(n, dtype=torch.float64))
    exact = torch.linalg.solve(N, b)
    xg, infog = TaskCG(blocks=blocks, steps=n, method="gmres").solve(N, b)
    assert infog.converged and torch.allclose(xg, exact, rtol=1e-8, atol=1e-10)
    x2g, _ = TaskCG(blocks=blocks, steps=2, method="gmres").solve(N, b)
    for i in range(blocks):
        alone, _ = inn.GMRES(max_steps=2, rtol=0.0, atol=0.0).solve(N[i * n:(i + 1) * n, i * n:(i + 1) * n],
                                                                     b[i * n:(i + 1) * n])
        assert torch.allclose(x2g[i * n:(i + 1) * n], alone, rtol=1e-9, atol=1e-11)
    x2l, _ = TaskCG(blocks=blocks, steps=2, sizes=sizes, method="gmres").solve(N[perm][:, perm], b[perm])
    assert torch.allclose(x2l, x2g[perm], rtol=1e-9, atol=1e-11)
    xw, infow = TaskCG(steps=1, method="gmres").solve(N, b, groups=blocks, x0=exact)
    assert infow.matvecs == 2 and torch.allclose(xw, exact, rtol=1e-8, atol=1e-10)
    # method="minres": GMRES's iterates (symmetric blocks, an indefinite one among them), both layouts,
    # and warm starts (a start worse than zero is dropped, as by GMRES)
    for steps in (1, 2, n):
        xm, infom = TaskCG(blocks=blocks, steps=steps, method="minres").solve(N, b)
        xg, _ = TaskCG(blocks=blocks, steps=steps, method="gmres").solve(N, b)
        assert infom.converged and torch.allclose(xm, xg, rtol=1e-8, atol=1e-10)
    xml, _ = TaskCG(blocks=blocks, steps=2, sizes=sizes, method="minres").solve(N[perm][:, perm], b[perm])
    assert torch.allclose(xml, x2g[perm], rtol=1e-9, atol=1e-11)
    for start in (exact, -100 * exact, exact + 0.1 * b):
        xm, infom = TaskCG(steps=2, method="minres").solve(N, b, groups=blocks, x0=start)
        xg, _ = TaskCG(steps=2, method="gmres").solve(N, b, groups=blocks, x0=start)
        assert infom.matvecs == 3 and torch.allclose(xm, xg, rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="method"):
        TaskCG(method="bicg")
    with pytest.raises(ValueError, match="do not make"):
        TaskCG(blocks=4, steps=2).solve(A, b)
    with pytest.raises(ValueError, match="steps"):
        TaskCG(blocks=2, steps=0)


def test_fixed_steps_runs_its_budget_and_reports_done():
    from implicit_nash.meta.inner import FixedSteps
    gen = torch.Generator().manual_seed(1)
    M = torch.randn(30, 30, generator=gen, dtype=torch.float64)
    A = M @ M.T + 0.1 * torch.eye(30, dtype=torch.float64)
    b = torch.randn(30, generator=gen, dtype=torch.float64)
    x, info = FixedSteps(steps=3).solve(A, b)
    assert info.converged and info.steps == 3 and info.residual > 1e-3 * float(b.norm())
    assert "fixed budget of 3 steps" in info.message
    assert math.isclose(info.residual, float((A @ x - b).norm()), rel_tol=1e-8)
    # its GMRES(3) without restart: the core GMRES's iterate after 3 steps, on a non-symmetric system
    N = A + (M - M.T)
    x, info = FixedSteps(steps=3).solve(N, b)
    core, _ = inn.GMRES(max_steps=3, rtol=0.0, atol=0.0).solve(N, b)
    assert info.matvecs == 3 and torch.allclose(x, core, rtol=1e-9, atol=1e-12)
    assert math.isclose(info.residual, float((N @ x - b).norm()), rel_tol=1e-8)
    # a warm start from the solution stays there (one product more); one worse than zero is dropped
    exact = torch.linalg.solve(N, b)
    xw, infow = FixedSteps(steps=2).solve(N, b, x0=exact)
    assert infow.matvecs == 3 and infow.warm == 1 and torch.allclose(xw, exact, rtol=1e-9, atol=1e-12)
    xb, infob = FixedSteps(steps=3).solve(N, b, x0=-100 * exact)
    assert infob.warm == 0 and torch.allclose(xb, x, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="steps"):
        FixedSteps(steps=0)


def test_budget_krylov_programs_equal_the_eager_iterations():
    """The compiled inner solves' programs, written without host synchronisation, give the eager
    methods' iterates: fixed-budget CG per block (an indefinite block stops at its curvature, a
    zero block stays put) and GMRES with and without an exhausted Krylov space."""
    from implicit_nash.meta.inner import _cg_budget, _gmres, _gmres_budget, _truncated_cg
    gen = torch.Generator().manual_seed(5)
    n, rows = 12, 4
    mats = []
    for i in range(rows):
        M = torch.randn(n, n, generator=gen, dtype=torch.float64)
        S = M @ M.T / n + (0.5 if i != 2 else -3.0) * torch.eye(n, dtype=torch.float64)  # row 2 indefinite
        mats.append(S)

    def mv(v):
        return torch.cat([a @ x for a, x in zip(mats, v.reshape(rows, -1))])

    b = torch.randn(rows * n, generator=gen, dtype=torch.float64)
    b[3 * n:] = 0.0  # a zero right-hand side
    for steps in (1, 3, 6):
        eager, _ = _truncated_cg(mv, b, steps, torch.zeros(rows, dtype=torch.float64), rows)
        torch.testing.assert_close(_cg_budget(mv, b, steps, rows), eager, rtol=1e-12, atol=1e-14)
    for r in (1, rows):
        x, _, res, _ = _gmres(mv, b, 5, rows=r)
        x2, res2 = _gmres_budget(mv, b, 5, r)
        torch.testing.assert_close(x2, x, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(res2, res, rtol=1e-8, atol=1e-12)
    x3, res3 = _gmres_budget(lambda v: 2.0 * v, b, 5, rows)  # the Krylov space is exhausted at once
    torch.testing.assert_close(x3, b / 2)
    assert float(res3.max()) < 1e-12


@pytest.mark.parametrize("pen_name, second", [(None, True), ("centroid", False), ("robust_mild", False)])
def test_compiled_budgeted_imaml_gives_the_eager_meta_gradient(pen_name, second, batch):
    """IMAML(compiled=True): the Newton steps' Krylov iterations (forward-over-reverse products) and
    the backward's budgeted MINRES / GMRES as compiled programs (aot_eager here: no C++ compiler)
    give the eager meta-gradient in float64, at first order and (plain iMAML; the penalties' second
    order takes the same path) at second order, the backward differentiated again, and nothing runs
    eagerly (no warning)."""
    import dataclasses
    import warnings
    pen = None if pen_name is None else (RobustPenalty(weight=0.02, robustness=1.0, C=1e-2)
                                         if pen_name == "robust_mild" else PENALTIES[pen_name])
    from implicit_nash.meta.inner import NewtonKrylov
    eager = IMAML(lam=5.0, penalty=pen, budget=2, cg_budget=4, newton=NewtonKrylov(krylov_steps=3))
    model, theta = setup(eager)

    def first_and_second(algo):
        ls = leaves(theta)
        gs = torch.autograd.grad(algo.task_losses(model, theta, batch).mean(), ls, create_graph=True)
        g = torch.cat([x.reshape(-1) for x in gs])
        v = torch.linspace(-1, 1, g.numel(), dtype=g.dtype)
        h = torch.cat([x.reshape(-1) for x in torch.autograd.grad((g * v).sum(), ls)])
        return g.detach(), h

    g = _grad(eager, model, theta, batch)
    compiled = dataclasses.replace(eager, compiled=True, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        gf = _grad(compiled, model, theta, batch)  # a first-order backward (the trainer's)
        torch.testing.assert_close(gf, g, rtol=1e-9, atol=1e-12)
        if second:
            g2, h = first_and_second(eager)
            gc, hc = first_and_second(compiled)
            torch.testing.assert_close(gc, g2, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(hc, h, rtol=1e-7, atol=1e-10)
    assert float((g - _grad(IMAML(lam=5.0, penalty=pen, budget=1, cg_budget=1), model, theta, batch)).norm()) > 1e-6


def test_compiled_imaml_that_cannot_compile_says_so_and_runs_eagerly(batch, monkeypatch):
    """A compilation failure (here: an unknown backend) is no silent change: the Newton steps run
    eagerly with a RuntimeWarning naming the reason, the backward's solve says 'ran eagerly' in its
    info, and the meta-gradient is the eager one."""
    import dataclasses
    import implicit_nash.meta.imaml as imaml_module
    from implicit_nash.meta.inner import FixedSteps, TaskCG
    monkeypatch.setattr(imaml_module, "_NOTED", set())
    eager = IMAML(lam=5.0, budget=2, cg_budget=3)
    model, theta = setup(eager)
    g = _grad(eager, model, theta, batch)
    broken = dataclasses.replace(eager, compiled=True, backend="no_such_backend")
    with pytest.warns(RuntimeWarning, match="ran eagerly: the compiled Newton step failed"):
        gb = _grad(broken, model, theta, batch)
    torch.testing.assert_close(gb, g, rtol=1e-12, atol=1e-14)
    op = inn.LinearOperator(lambda v: 3.0 * v, symmetric=True)
    b = torch.ones(6, dtype=torch.float64)
    for solver in (TaskCG(blocks=2, steps=2, method="minres", compiled=True),
                   FixedSteps(steps=2, compiled=True)):
        x, info = solver.solve(op, b)
        torch.testing.assert_close(x, b / 3)
        assert "ran eagerly: the operator has no functional form" in info.message, info.message
    with pytest.raises(ValueError, match="runs MINRES only"):
        TaskCG(steps=2, compiled=True)
    with pytest.raises(TypeError, match="compiled must be True or False"):
        IMAML(compiled="yes")
