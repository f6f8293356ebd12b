"""The per-task loop (``task_vectorisation="loop"``) against the vmapped tasks, in float64 on a tiny
conv-4: the same losses and the same meta-gradients, for every way the loop path is entered."""
import pytest
import torch

from implicit_nash._compat import tree_leaves
from implicit_nash.meta import CAVIA, MAML, TRMAML, MetaSGD
from implicit_nash.penalties import CentroidPenalty, ProximalPenalty, RobustPenalty
from implicit_nash.tasks import Conv4

DT = torch.float64


def _batch(B=3, n=8, size=8, ways=2):
    g = torch.Generator().manual_seed(0)
    return {"x_support": torch.rand(B, n, 3, size, size, generator=g, dtype=DT),
            "y_support": torch.randint(0, ways, (B, n), generator=g),
            "x_query": torch.rand(B, n, 3, size, size, generator=g, dtype=DT),
            "y_query": torch.randint(0, ways, (B, n), generator=g),
            "task_ids": torch.tensor([0, 2, 3])}


def _model(context_dim=0):
    torch.manual_seed(1)
    return Conv4(3, 4, 2, 8, context_dim=context_dim).to(DT)


ALGORITHMS = {
    "maml": lambda tv: MAML(inner_steps=2, inner_lr=0.1, loss="cross_entropy", task_vectorisation=tv),
    "maml_pc": lambda tv: MAML(inner_steps=2, inner_lr=0.1, loss="cross_entropy", task_vectorisation=tv,
                               penalty=CentroidPenalty(weight=0.5, num_tasks=10, inner_lr=0.1)),
    "maml_prox": lambda tv: MAML(inner_steps=2, inner_lr=0.1, loss="cross_entropy", task_vectorisation=tv,
                                 penalty=ProximalPenalty(lam=0.7)),
    "metasgd_pr": lambda tv: MetaSGD(inner_steps=2, inner_lr=0.1, loss="cross_entropy", task_vectorisation=tv,
                                     penalty=RobustPenalty(weight=0.5, robustness=2)),
    "metasgd": lambda tv: MetaSGD(inner_steps=2, inner_lr=0.1, loss="cross_entropy", task_vectorisation=tv),
    "fomaml": lambda tv: MAML(inner_steps=2, inner_lr=0.1, loss="cross_entropy", task_vectorisation=tv,
                              meta_gradient="first_order"),
    "cavia_pc": lambda tv: CAVIA(inner_steps=2, inner_lr=0.5, loss="cross_entropy", task_vectorisation=tv,
                                 context_dim=3, penalty=CentroidPenalty(weight=0.5, num_tasks=10, inner_lr=0.5)),
    "cavia": lambda tv: CAVIA(inner_steps=2, inner_lr=0.5, loss="cross_entropy", task_vectorisation=tv,
                              context_dim=3),
    "trmaml": lambda tv: TRMAML(inner_steps=2, inner_lr=0.1, loss="cross_entropy", task_vectorisation=tv),
}


def _run(name, tv):
    algo = ALGORITHMS[name](tv)
    model = _model(algo.context_dim if isinstance(algo, CAVIA) else 0)
    theta = algo.init(model)
    batch = _batch()
    state = algo.init_state(5, batch["x_support"])
    losses = algo.task_losses(model, theta, batch)
    outer = algo.outer_loss(losses, batch, state)
    grads = torch.autograd.grad(outer, tree_leaves(theta))
    return losses.detach(), grads


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_loop_equals_vmap(name):
    (l_v, g_v), (l_l, g_l) = _run(name, "vmap"), _run(name, "loop")
    torch.testing.assert_close(l_l, l_v, rtol=1e-12, atol=1e-12)
    scale = max(float(g.abs().max()) for g in g_v)
    assert scale > 0
    for a, b in zip(g_l, g_v):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12 * scale)


def test_auto_loops_for_conv_on_cpu_only():
    algo = MAML(inner_steps=1, inner_lr=0.1, loss="cross_entropy")
    x, net = torch.zeros(2, 3, 3, 8, 8), _model()
    assert algo._loops(net, x, "unrolled")
    assert not algo._loops(net, x, "implicit")
    assert not algo._loops(torch.nn.Linear(3, 2), x, "unrolled")
    assert not MAML(task_vectorisation="vmap")._loops(net, x, "unrolled")
    # inside a torch.func transform (the trainer's vectorised seeds) the tasks are vmapped
    seen = []
    torch.func.vmap(lambda t: seen.append(algo._loops(net, x, "unrolled")) or t)(torch.zeros(2))
    assert seen == [False]


def test_evaluation_without_grad_equal():
    batch = _batch()
    out = []
    for tv in ("vmap", "loop"):
        algo = MAML(inner_steps=2, inner_lr=0.1, loss="cross_entropy", task_vectorisation=tv)
        model = _model()
        with torch.no_grad():
            theta = algo.init(model)
            out.append([algo.task_losses(model, theta, batch, mode="first_order", metric=m) for m in (None, "accuracy")])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_per_task_backward_is_first_order_only():
    algo = ALGORITHMS["maml"]("loop")
    model = _model()
    theta = algo.init(model)
    losses = algo.task_losses(model, theta, _batch())
    (g,) = torch.autograd.grad(losses.mean(), [theta["params"]["head.bias"]], create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def test_bad_task_vectorisation():
    with pytest.raises(ValueError, match="task_vectorisation must be one of"):
        MAML(task_vectorisation="threads")


def test_task_vectorisation_config_key_reaches_the_algorithm():
    from implicit_nash.cli import build_parser, _TRAIN_KEYS
    from implicit_nash.meta.config import ConfigError, build_algorithm, resolve

    args = build_parser().parse_args(["train", "sinusoid", "--out", "x", "--task-vectorisation", "loop"])
    c = resolve({**{k: getattr(args, k) for k in _TRAIN_KEYS}, "task": "sinusoid"})
    algo = build_algorithm(c, 100)
    assert algo.task_vectorisation == "loop"
    # an MLP, which auto would vmap, is looped over
    assert algo._loops(torch.nn.Linear(1, 1), torch.zeros(2, 5, 1), "unrolled")
    assert build_algorithm(resolve({"task": "sinusoid"}), 100).task_vectorisation == "auto"
    for bad, match in (({"task_vectorisation": "threads"}, "must be one of auto, vmap, loop"),
                       ({"task_vectorisation": "loop", "seeds": [0, 1]}, "seeds trained together"),
                       ({"task_vectorisation": "loop", "algorithm": "imaml"}, "implicit meta-gradient")):
        with pytest.raises(ConfigError, match=match):
            resolve({"task": "sinusoid", **bad})
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "sinusoid", "--out", "x", "--task-vectorisation", "threads"])
