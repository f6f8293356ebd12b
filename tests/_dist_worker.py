"""Worker of tests/test_distributed.py: one rank of a gloo process group (spawned, not imported by pytest)."""
import torch
import torch.distributed as dist


def problems():
    import implicit_nash as inn
    from implicit_nash.meta import IMAML, MAML
    from implicit_nash.meta.inner import NewtonKrylov
    from implicit_nash.penalties import CentroidPenalty, RobustPenalty
    return {
        "maml_pC_unrolled": MAML(inner_steps=3, inner_lr=0.1, penalty=CentroidPenalty(weight=0.3, num_tasks=10, inner_lr=0.5)),
        "maml_pR_unrolled": MAML(inner_steps=3, inner_lr=0.1, penalty=RobustPenalty(weight=0.2, robustness=2.0, C=1e-4)),
        "maml_pC_implicit": IMAML(lam=5.0, penalty=CentroidPenalty(weight=0.3), solver=inn.PRGD(rtol=1e-12)),
        "maml_pR_implicit": IMAML(lam=5.0, penalty=RobustPenalty(weight=0.02, robustness=1.0, C=1e-2),
                                  solver=inn.PRGD(rtol=1e-12)),
        # Newton-Krylov (meta/inner.py): per-task minimisation (plain), one CG over the coupled system
        # with all-reduced dots (p_C), GMRES after a per-task warm start (p_R), and the budgeted mode
        "imaml_newton": IMAML(lam=5.0, newton=NewtonKrylov(rtol=1e-12), linear_solver=inn.GMRES(rtol=1e-12)),
        "imaml_newton_pC": IMAML(lam=5.0, penalty=CentroidPenalty(weight=0.3), newton=NewtonKrylov(rtol=1e-12),
                                 linear_solver=inn.GMRES(rtol=1e-12)),
        "imaml_newton_pR": IMAML(lam=5.0, penalty=RobustPenalty(weight=0.02, robustness=1.0, C=1e-2),
                                 newton=NewtonKrylov(rtol=1e-12), linear_solver=inn.GMRES(rtol=1e-12)),
        "imaml_newton_budgeted": IMAML(lam=5.0, budget=2, cg_budget=3, newton=NewtonKrylov(krylov_steps=3)),
    }


def batch(B=4, K=5, Q=6):
    g = torch.Generator().manual_seed(7)
    x = 10 * torch.rand(B, K + Q, 1, generator=g, dtype=torch.float64) - 5
    y = (0.5 + torch.rand(B, 1, 1, generator=g, dtype=torch.float64)) * torch.sin(x + 1.0)
    return {"x_support": x[:, :K], "y_support": y[:, :K], "x_query": x[:, K:], "y_query": y[:, K:]}


def meta_gradient(algo, b, sharded_ranks=None):
    from implicit_nash.tasks import mlp
    torch.manual_seed(0)
    model = mlp([1, 6, 1], "tanh").double()
    theta = algo.init(model)
    leaves = [v for d in theta.values() for v in d.values()]
    if sharded_ranks is None:
        loss = algo.outer_loss(algo.task_losses(model, theta, b), b, {})
        return [g.detach() for g in torch.autograd.grad(loss, leaves)]
    from implicit_nash import distributed as D
    w, r = sharded_ranks
    mine = D.shard(b, r, w)
    B = b["x_support"].shape[0]
    with D.sharded():
        # this rank's mean weighted by its share of the tasks (the blocks differ in size when w does not divide B)
        loss = algo.outer_loss(algo.task_losses(model, theta, mine), mine, {}) * (mine["x_support"].shape[0] / B)
        grads = list(torch.autograd.grad(loss, leaves))
    for g in grads:
        dist.all_reduce(g)
    return [g.detach() for g in grads]


def run(rank, world, init_file, out_dir, configs, sizes=(4,)):
    """Sharded meta-gradients of every problem at every meta-batch size, then a sharded training run of
    every configuration (``configs[k]`` into ``out_dir/run{k}``)."""
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {(name, B): meta_gradient(algo, batch(B), (world, rank))
                   for name, algo in problems().items() for B in sizes}
        if rank == 0:
            torch.save(results, f"{out_dir}/grads.pt")
        from implicit_nash.meta.trainer import train
        for k, config in enumerate(configs):
            train({**config, "distributed": True}, f"{out_dir}/run{k}", progress=False, log=lambda s: None)
    finally:
        dist.destroy_process_group()
