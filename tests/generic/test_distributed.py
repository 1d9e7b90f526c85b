"""DDP and FSDP2 (fully_shard) with gloo processes on CPU match a single-process run on the full batch, every step.

FSDP2 params are DTensor shards (dim 0, uneven: some ranks hold empty shards). Element-wise optimizers update the
local shards; the reductions (NovoGrad, NvNovoGrad, ..., and max_grad_norm on any optimizer) compute their
per-tensor statistics on the local shards and combine them with one collective (fused_optim/_sharded.py).
One spawn per (mode, world size) runs every case on both paths inside the same process group.
"""
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STEPS = 3
CLIP = 0.05  # below the grads' norm at every step: clipping is active (asserted)

# (registry name, constructor kwargs): the cases every mode runs, on the reference and the fused path
CASES = [
    ("adamw", dict(lr=0.01)),
    ("sgd", dict(lr=0.05, momentum=0.9)),
    ("adamw", dict(lr=0.01, max_grad_norm=CLIP)),
    ("novograd", dict(lr=0.01, weight_decay=0.1)),
    ("nvnovograd", dict(lr=0.01, weight_decay=0.1, decoupled_decay=True, max_grad_norm=CLIP)),
]


def _model():
    # 20 rows (even over 2 and 4 ranks), 3 rows and 1 row (uneven: some ranks' shards are empty)
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 20), torch.nn.Tanh(), torch.nn.Linear(20, 3), torch.nn.Tanh(),
                               torch.nn.Linear(3, 1))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 8, generator=g), torch.randn(16, 1, generator=g)


def _full(p):
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()


def _train(model, opt, x, y):
    """The params after every step, and the optimizer's grad norms (max_grad_norm)."""
    steps, norms = [], []
    for _ in range(STEPS):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        steps.append([_full(p) for p in model.parameters()])
        if opt.last_grad_norm is not None:
            norms.append(float(opt.last_grad_norm))
    return steps, norms


def _wrap(model, mode):
    if mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def _refusals():
    """Placements the reductions cannot handle exactly are refused, naming the param, before anything changes."""
    import fused_optim
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    w = torch.nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)]))
    w.grad = distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)])
    before = _full(w)
    out = {}
    opt = fused_optim.REGISTRY["novograd"]([torch.nn.Parameter(torch.randn(2)), w], lr=0.1)
    opt.param_groups[0]["params"][0].grad = torch.ones(2)
    try:
        opt.step()
        out["novograd"] = "no error"
    except NotImplementedError as exc:
        out["novograd"] = str(exc)
    out["novograd unchanged"] = torch.equal(_full(w), before) and not opt.state
    # max_grad_norm needs only sums of squares: any Shard(d) is exact
    grad = w.grad
    want = float(_full(grad).norm())
    for fused in (False, True):
        w.grad = grad.clone()  # (the step writes back the clipped grad)
        opt = fused_optim.REGISTRY["adamw"]([w], lr=0.1, max_grad_norm=1e-3, fused=fused)
        opt.step()
        out["clip norm", fused] = (float(opt.last_grad_norm), want)
    lbfgs = fused_optim.REGISTRY["lbfgs"]([w])
    try:
        lbfgs.step(lambda: (w.grad.zero_(), 0.0)[1])
        out["lbfgs"] = "no error"
    except (NotImplementedError, RuntimeError) as exc:
        out["lbfgs"] = str(exc)
    return out


def _rank_work(rank, world, mode, out):
    import fused_optim
    x, y = _data()
    x, y = x.chunk(world)[rank], y.chunk(world)[rank]
    results = {}
    for i, (name, kw) in enumerate(CASES):
        for fused in (False, True):
            model = _wrap(_model(), mode)
            opt = fused_optim.REGISTRY[name](model.parameters(), fused=fused, **kw)
            results[i, fused] = _train(model, opt, x, y)
    if mode == "fsdp2":
        results["refusals"] = _refusals()
    if rank == 0:
        torch.save(results, out)


def _worker(rank, store_path, world, mode, out):
    # a file store: no TCP port to race for when several test workers run distributed tests at once
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        _rank_work(rank, world, mode, out)
    except BaseException:
        dist.destroy_process_group()
        raise  # torch's spawn wrapper hands the traceback to the parent
    dist.barrier()  # every rank is done: nothing more goes over gloo
    # A rank once died in CI with "terminate called without an active exception" (SIGABRT: a C++ thread object
    # destroyed while still running, i.e. gloo's teardown). Past the barrier there is nothing left to do, so leave
    # without any teardown; torch.save has closed the result file, the streams are flushed here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _single(name, kw, fused):
    import fused_optim
    model = _model()
    x, y = _data()
    return _train(model, fused_optim.REGISTRY[name](model.parameters(), fused=fused, **kw), x, y)


@pytest.mark.parametrize("mode,world", [("ddp", 2), ("fsdp2", 2), ("fsdp2", 4)])
def test_distributed_matches_single_process(tmp_path, mode, world):
    out = str(tmp_path / "results.pt")
    mp.spawn(_worker, args=(str(tmp_path / "store"), world, mode, out), nprocs=world, join=True)
    got = torch.load(out)
    for i, (name, kw) in enumerate(CASES):
        for fused in (False, True):
            steps, norms = got[i, fused]
            want_steps, want_norms = _single(name, kw, fused)
            where = f"{name} {kw} fused={fused}"
            for step, (a_list, b_list) in enumerate(zip(steps, want_steps)):
                for a, b in zip(a_list, b_list):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{where}, step {step + 1}")
            assert len(steps) == STEPS
            if "max_grad_norm" in kw:
                assert len(norms) == STEPS and min(want_norms) > CLIP, where  # clipping was active
                torch.testing.assert_close(torch.tensor(norms), torch.tensor(want_norms), rtol=1e-5, atol=0)
    if mode == "fsdp2":
        r = got["refusals"]
        assert "param 1 of param group 0" in r["novograd"] and "Shard(dim=1)" in r["novograd"], r["novograd"]
        for fused in (False, True):
            got_norm, want_norm = r["clip norm", fused]
            assert want_norm > 1 and got_norm == pytest.approx(want_norm, rel=1e-5), (fused, got_norm, want_norm)
        assert r["novograd unchanged"], r
        assert "DTensor" in r["lbfgs"], r["lbfgs"]
