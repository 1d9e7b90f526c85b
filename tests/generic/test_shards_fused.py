"""The fused kernels of the reductions on FSDP2 (DTensor, dim-0, uneven) shards: with gloo processes on CPU, the
params after every step match a single process on the full batch, and each step makes the launches and the
collectives it states (fused_optim/_sharded.py; kernels/README.md, Note [projection shards]).

The model (test_distributed._model) has weights of 20 rows (projected per layer), 3 rows (per channel; 2 + 1 rows
on 2 ranks) and 1 row (an empty shard on every rank but the first), and 1-D biases; _Conv has 3-D weights that
Adafactor factors over dims 0, 1 (5 rows, 3 planes) and over dims 1, 2 (2 planes, one per rank); MIXED puts a
Shard(0) and a Replicate weight in one group; LOW has bf16 and fp16 params. Bad placements are refused before any
change.
"""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from test_distributed import _data, _full, _model, _worker, _wrap



class _Conv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv1d(4, 5, 3)
        self.w = torch.nn.Parameter(torch.randn(2, 5, 6) * 0.3)

    def forward(self, x):
        return torch.einsum("bcl,kcl->bk", torch.tanh(self.conv(x)), self.w)


def _conv_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 4, 8, generator=g), torch.randn(16, 2, generator=g)


def _wrap_conv(model):
    from torch.distributed.fsdp import fully_shard
    fully_shard(model.conv)
    return fully_shard(model)


MODELS = {"mlp": (_model, _data, lambda m: _wrap(m, "fsdp2")), "conv": (_Conv, _conv_data, _wrap_conv)}
# (name, kwargs, fused launches per step, collectives per step, model): one param group, one dtype
CASES_2 = [
    ("sgdp", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1), 2, 1, "mlp"),
    ("sgdp", dict(lr=0.05, momentum=0.9, caution=True), 3, 2, "mlp"),
    ("adamp", dict(lr=0.01, weight_decay=0.1, nesterov=True), 2, 1, "mlp"),
    ("adamp", dict(lr=0.01, weight_decay=0.1, caution=True), 3, 2, "mlp"),
    # factored weights 20 x 8 and 3 x 20 (columns span the shards), unfactored 1 x 3 and biases:
    # ROWCOL, FOLD, NORMS, [MOMENTS,] APPLY; the combines after ROWCOL, NORMS[, MOMENTS]
    ("adafactor", dict(min_dim_size_to_factor=2, betas=(0.9, 0.99), caution=True), 5, 3, "mlp"),
    ("adafactor", dict(lr=0.01, min_dim_size_to_factor=2, weight_decay=0.1), 4, 2, "mlp"),
    ("adafactor", dict(min_dim_size_to_factor=2, betas=(0.9, 0.99), caution=True), 5, 3, "conv"),
    # the clip's sums of squares and factor, STATS, APPLY; the combines after the clip's sums and STATS
    ("lamb", dict(lr=0.01, weight_decay=0.1, caution=True), 4, 2, "mlp"),
    # the lean options in the same launches: bf16 moments (rounded to nearest) on the local shards
    ("lamb", dict(lr=0.01, weight_decay=0.1, state_dtype=torch.bfloat16), 4, 2, "mlp"),
]
STEPS_2 = 4
# one 4-rank job over several families (4 processes on 2 cores: few steps)
CASES_4 = [
    ("adam", dict(lr=0.01), None, 0, "mlp"),
    ("novograd", dict(lr=0.01, weight_decay=0.1), None, 1, "mlp"),
    ("sgdp", dict(lr=0.05, momentum=0.9, weight_decay=0.1), 2, 1, "mlp"),
    ("adafactor", dict(min_dim_size_to_factor=2, betas=(0.9, 0.99)), 4, 2, "mlp"),
    ("lamb", dict(lr=0.01, caution=True, max_grad_norm=0.05), 4, 2, "mlp"),
    # caution's mask counts: the statistics pass, the combine, the update
    ("lion", dict(lr=0.01, weight_decay=0.1, caution=True), 2, 1, "mlp"),
]
STEPS_4 = 3


def _run(model, opt, x, y, steps):
    """The params after every step, and per step the launches and Layout.full_sums calls it made."""
    from fused_optim._sharded import Layout
    from fused_optim.kernels import runtime

    calls = []
    full_sums = Layout.full_sums

    def counted(self, partials):
        calls[-1][1] += 1
        return full_sums(self, partials)

    Layout.full_sums = counted
    params = []
    try:
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            before = runtime.launch_count
            calls.append([0, 0])
            opt.step()
            calls[-1][0] = runtime.launch_count - before
            params.append([_full(p) for p in model.parameters()])
    finally:
        Layout.full_sums = full_sums
    return params, calls


REFUSED = [("adafactor", dict(min_dim_size_to_factor=2)), ("sgdp", dict(lr=0.1)), ("lars", dict(weight_decay=0.1)),
           ("lamb", dict())]


def _refusals():
    """A placement the fused kernels cannot combine exactly (dim 1 sharded: Adafactor's factored dims, SGDP's rows,
    Lars' and Lamb's per-tensor norms) is refused before any change, naming the param and its placement."""
    import fused_optim
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    out = {}
    for name, kw in REFUSED:
        w = torch.nn.Parameter(distribute_tensor(torch.randn(6, 8), mesh, [Shard(1)]))
        w.grad = distribute_tensor(torch.randn(6, 8), mesh, [Shard(1)])
        before = _full(w)
        opt = fused_optim.REGISTRY[name]([torch.nn.Parameter(torch.randn(3)), w], fused=True, **kw)
        opt.param_groups[0]["params"][0].grad = torch.ones(3)
        try:
            opt.step()
            out[name] = "no error"
        except NotImplementedError as exc:
            out[name] = str(exc)
        out[name, "unchanged"] = torch.equal(_full(w), before) and not opt.state
    return out


# Shard(0) and Replicate params in one group (the combine keeps the replicated tensors' local sums)
MIXED = [("sgdp", dict(lr=0.05, momentum=0.9, caution=True)), ("adafactor", dict(min_dim_size_to_factor=2)),
         ("lars", dict(lr=0.5, momentum=0.9, weight_decay=0.1, trust_coeff=0.01)),
         ("lamb", dict(lr=0.01, caution=True)),
         ("adopt", dict(lr=0.01, caution=True)),
         # the sharded [7, 6] orthogonalized on its owner rank, the replicated [5, 4] on every rank
         ("muon", dict(lr=0.02))]
# compared with the same path on one process (Muon's fused chain is batched: bf16 roundings of another order than
# the reference's per-matrix chain, tests/optimizers/test_muon.py); the others with the reference path
SAME_PATH = ("muon",)


def _start(dtype):
    """The generator of _mixed_run's grads, and its params before the first step."""
    g = torch.Generator().manual_seed(2)
    return g, [torch.randn(7, 6, generator=g).to(dtype), torch.randn(5, 4, generator=g).to(dtype)]


def _mixed_run(name, kw, wrap, fused, dtype=torch.float32):
    """3 steps on a [7, 6] and a replicated [5, 4] weight with fixed grads: the full params after each."""
    import fused_optim
    g, full = _start(dtype)
    params = [torch.nn.Parameter(wrap(t, i)) for i, t in enumerate(full)]
    opt = fused_optim.REGISTRY[name](params, fused=fused, **kw)
    out = []
    for _ in range(3):
        for i, p in enumerate(params):
            p.grad = wrap(torch.randn(p.shape, generator=g).to(dtype), i)
        opt.step()
        out.append([_full(p) for p in params])
    return out


# bf16 / fp16 params on Shard(0) (7 rows: 4 + 3), both paths, every family that combines statistics over shards
LOW = [(name, kw, dtype) for dtype in (torch.bfloat16, torch.float16) for name, kw in (
    ("adamw", dict(lr=0.01, eps=1e-3, max_grad_norm=0.5)), ("novograd", dict(lr=0.01, weight_decay=0.1)),
    ("sgdp", dict(lr=0.05, momentum=0.9, weight_decay=0.1)), ("adafactor", dict(min_dim_size_to_factor=2)),
    ("lamb", dict(lr=0.01, caution=True)), ("lion", dict(lr=0.01, caution=True)))]


def _mixed():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    wrap = lambda t, i: distribute_tensor(t, mesh, [Shard(0) if i == 0 else Replicate()])  # noqa: E731
    shard = lambda t, i: distribute_tensor(t, mesh, [Shard(0)])  # noqa: E731
    return ([_mixed_run(name, kw, wrap, True) for name, kw in MIXED],
            {(i, fused): _mixed_run(name, kw, shard, fused, dtype) for i, (name, kw, dtype) in enumerate(LOW)
             for fused in (False, True)})


def _cases_work(rank, world, cases, steps, out):
    import fused_optim
    results = {}
    for i, (name, kw, _, _, kind) in enumerate(cases):
        make, data, wrap = MODELS[kind]
        x, y = (t.chunk(world)[rank] for t in data())
        model = wrap(make())
        results[i] = _run(model, fused_optim.REGISTRY[name](model.parameters(), fused=True, **kw), x, y, steps)
    if world == 2:
        results["refusals"] = _refusals()
        results["mixed"] = _mixed()
    if rank == 0:
        torch.save(results, out)


def _check(tmp_path, world, cases, steps):
    import fused_optim
    out = str(tmp_path / "results.pt")
    mp.spawn(_worker, args=(str(tmp_path / "store"), world, (cases, steps, out), None, _cases_work), nprocs=world,
             join=True)
    got = torch.load(out)
    for i, (name, kw, launches, collectives, kind) in enumerate(cases):
        make, data, _ = MODELS[kind]
        model = make()
        x, y = data()
        want, _ = _run(model, fused_optim.REGISTRY[name](model.parameters(), fused=False, **kw), x, y, steps)
        params, calls = got[i]
        assert len(params) == steps
        for step, (a_list, b_list) in enumerate(zip(params, want)):
            for a, b in zip(a_list, b_list):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6,
                                           msg=f"{name} {kw} {kind}, {world} ranks, step {step}")
        if launches is not None:  # SGDP/AdamP, Adafactor: their stated launches, one collective per statistic
            assert calls == [[launches, collectives]] * steps, (name, kw, calls)
        else:
            assert all(c[1] == collectives and c[0] > 0 for c in calls), (name, kw, calls)
    mixed, low = got["mixed"] if world == 2 else ((), {})
    for (name, kw), steps_got in zip(MIXED, mixed):
        for a_list, b_list in zip(steps_got, _mixed_run(name, kw, lambda t, i: t, name in SAME_PATH)):
            for a, b in zip(a_list, b_list):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name} Shard(0) + Replicate")
    for (i, fused), steps_got in low.items():
        name, kw, dtype = LOW[i]
        want = _mixed_run(name, kw, lambda t, i: t, fused, dtype)
        if fused:
            # fp32 math on the loaded values: the shards change only the order the fp32 statistics are summed in,
            # so a param may round to the neighbouring bf16 / fp16 value, never further (measured: all equal)
            for a_list, b_list in zip(steps_got, want):
                for a, b in zip(a_list, b_list):
                    assert a.dtype == dtype
                    torch.testing.assert_close(a, b, rtol=torch.finfo(dtype).eps, atol=1e-5,
                                               msg=f"{name} {dtype} Shard(0), fused")
        else:
            # the reference does the anchor's math in the params' dtype: each shard's statistics are rounded to it
            # before the sum, one process's after, so updates differ by that rounding (2^-8 relative in bf16):
            # the distance between the runs relative to the distance travelled (measured at most 0.9%, Lion bf16)
            a, b, start = (torch.cat([t.float().flatten() for t in ts])
                           for ts in (steps_got[-1], want[-1], _start(dtype)[1]))
            gap = float((a - b).norm() / (b - start).norm())
            assert gap <= 0.02, (name, dtype, gap)
    for name, _ in REFUSED if world == 2 else ():
        msg = got["refusals"][name]
        assert "param 1 of param group 0" in msg and "Shard(dim=1)" in msg, msg
        assert got["refusals"][name, "unchanged"], name


def test_fused_on_two_ranks(tmp_path):
    _check(tmp_path, 2, CASES_2, STEPS_2)


def test_families_fused_on_four_ranks(tmp_path):
    """One spawn of 4 ranks: element-wise (Adam), per-tensor norms (NovoGrad; Lamb, with its global clip),
    projections (SGDP) and Adafactor (the 3-row weight's shards: 1, 1, 1, 0 rows)."""
    _check(tmp_path, 4, CASES_4, STEPS_4)
