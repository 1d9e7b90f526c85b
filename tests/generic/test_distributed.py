"""DDP and FSDP2 (fully_shard) with 2 gloo processes on CPU match a single-process run on the full batch.

FSDP2 params are DTensor shards: both paths of an element-wise optimizer update the local shards; optimizers that
reduce over whole tensors (SGDP, AdamP, NovoGrad, NvNovoGrad, Adafactor) refuse DTensor params with a clear error.
"""
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
STEPS = 4


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 8, generator=g), torch.randn(16, 1, generator=g)


def _train(model, opt, x, y):
    for _ in range(STEPS):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _rank_work(rank, mode, name, fused, out):
    import fused_optim
    model = _model()
    if mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard
        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
    opt = fused_optim.REGISTRY[name](model.parameters(), lr=0.01, fused=fused)
    x, y = _data()
    if mode == "fsdp2" and not opt.elementwise:
        try:
            _train(model, opt, x.chunk(WORLD)[rank], y.chunk(WORLD)[rank])
        except NotImplementedError as exc:
            if rank == 0:
                torch.save(str(exc), out)
        return
    _train(model, opt, x.chunk(WORLD)[rank], y.chunk(WORLD)[rank])
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    if rank == 0:
        torch.save([t.detach().clone() for t in full], out)


def _worker(rank, store_path, mode, name, fused, out):
    # a file store: no TCP port to race for when several test workers run distributed tests at once
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
    try:
        _rank_work(rank, mode, name, fused, out)
    except BaseException:
        dist.destroy_process_group()
        raise  # torch's spawn wrapper hands the traceback to the parent
    dist.barrier()  # both ranks are done: nothing more goes over gloo
    # A rank once died in CI with "terminate called without an active exception" (SIGABRT: a C++ thread object
    # destroyed while still running, i.e. gloo's teardown). Past the barrier there is nothing left to do, so leave
    # without any teardown; torch.save has closed the result file, the streams are flushed here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
@pytest.mark.parametrize("name,fused", [("adamw", False), ("adamw", True), ("sgd", True), ("adamp", False)])
def test_distributed_matches_single_process(tmp_path, mode, name, fused):
    import fused_optim
    if name not in fused_optim.REGISTRY:
        pytest.skip(f"{name} not available")
    out = str(tmp_path / "params.pt")
    mp.spawn(_worker, args=(str(tmp_path / "store"), mode, name, fused, out), nprocs=WORLD, join=True)
    got = torch.load(out)
    if mode == "fsdp2" and not fused_optim.REGISTRY[name].elementwise:
        assert "not supported on DTensor" in got  # a clear refusal, not a silently wrong per-shard norm
        return
    model = _model()
    x, y = _data()
    _train(model, fused_optim.REGISTRY[name](model.parameters(), lr=0.01, fused=fused), x, y)
    for a, b in zip(got, model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
