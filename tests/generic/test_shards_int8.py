"""state_dtype="int8" on FSDP2 (DTensor, dim-0, uneven) shards, with gloo processes on CPU: each shard's blocks are
the full tensor's blocks of that shard, so the codes and block scales are those of one process (gathered, compared
exactly) and the params match one process every step; DCP saves and reshards them (2 ranks -> 2, 4, and one
process). A tensor whose shards cannot start on block boundaries is refused before any change, naming it.

The grads are given, the same full tensors on every rank and in the single process (a backward pass would give
the ranks' grads other roundings than one process's, and a state one rounding away from a code's boundary would
take the other code).
"""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from test_distributed import _full, _worker

MIN = 1024  # int8_min_numel: the (3,) bias keeps fp32 states
# scales: (1024, 16) one flat run of 64 blocks (shards of 512 or 256 rows: whole blocks), (1024,) 4 blocks,
# (3, 1024) and (5, 512) one row of scales per row (uneven: 2 + 1, 3 + 2 rows; 1, 1, 1, 0 and 2, 2, 1, 0 on 4)
SHAPES = [(1024, 16), (1024,), (3, 1024), (5, 512), (3,)]
# (name, kwargs, exact): element-wise, one made at the first step (SGD's momentum), and reductions whose statistics
# span the shards. exact: the quantized states come from the grads alone, so the codes and scales are one
# process's bit for bit; else a state depends on a sum over the shards too (Lars' trust ratio, Lamb's clip,
# NovoGrad's grad norms, SGDP's projection, Adafactor's factored RMS), whose rounding differs from one process's
# by ~1e-7, and a value that close to a code boundary takes the neighbouring code
CASES = [
    ("adamw", dict(lr=0.01, weight_decay=0.1), True),
    ("sgd", dict(lr=0.05, momentum=0.9), True),
    ("rmsprop", dict(lr=0.01, momentum=0.9), True),
    ("lamb", dict(lr=0.01, weight_decay=0.1, max_grad_norm=None), True),
    ("lion", dict(lr=0.01, weight_decay=0.1, caution=True), True),
    ("lamb", dict(lr=0.01), False),
    ("lars", dict(lr=0.1, momentum=0.9, weight_decay=0.1, trust_coeff=0.02), False),
    ("novograd", dict(lr=0.01, weight_decay=0.1), False),
    ("nvnovograd", dict(lr=0.01), False),
    ("sgdp", dict(lr=0.05, momentum=0.9, weight_decay=0.1), False),
    ("adamp", dict(lr=0.01, weight_decay=0.1), False),
    ("adafactor", dict(betas=(0.9, 0.99)), False),
]
STEPS, K = 4, 2  # DCP: saved after step K


def _params():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g) for s in SHAPES]


def _grads(step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g) * (0.5 + step) for s in SHAPES]


def _opt(name, kw, params, fused):
    import fused_optim
    return fused_optim.REGISTRY[name](params, fused=fused, state_dtype="int8", int8_min_numel=MIN, **kw)


def _states(opt, params):
    """Per param the codes and scales of its int8 states (full tensors), and its fp32 states' keys."""
    return [{k: _full(v) for k, v in opt.state[p].items() if k != "step" and isinstance(v, torch.Tensor)}
            for p in params]


def _steps(opt, params, steps, start=0, mesh=None):
    from torch.distributed.tensor import Shard, distribute_tensor
    out = []
    for step in range(start, start + steps):
        for p, g in zip(params, _grads(step)):
            p.grad = g if mesh is None else distribute_tensor(g, mesh, [Shard(0)])
        opt.step()
        out.append(([_full(p) for p in params], _states(opt, params)))
    return out


def _sharded(mesh):
    from torch.distributed.tensor import Shard, distribute_tensor
    return [torch.nn.Parameter(distribute_tensor(p, mesh, [Shard(0)])) for p in _params()]


def _work(rank, world, out):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    got = {}
    for i, (name, kw, _) in enumerate(CASES):
        for fused in (False, True):
            params = _sharded(mesh)
            opt = _opt(name, kw, params, fused)
            got[i, fused] = _steps(opt, params, STEPS, mesh=mesh)
            local = {k: v for k, v in opt.state[params[0]].items()
                     if k.endswith("_absmax") or getattr(v, "shape", None) == params[0].shape}  # (not Adafactor's row/col means)
            got[i, fused, "local"] = [(k, type(v).__name__, tuple(v.to_local().shape)) for k, v in local.items()]
    # (1000, 16): shards of 500 rows = 8000 elements, not whole 256-blocks
    w = torch.nn.Parameter(distribute_tensor(torch.randn(1000, 16), mesh, [Shard(0)]))
    w.grad = distribute_tensor(torch.randn(1000, 16), mesh, [Shard(0)])
    before = _full(w)
    opt = _opt("adamw", {}, [w], True)
    try:
        opt.step()
        got["refused"] = "no error"
    except NotImplementedError as e:
        got["refused"] = str(e)
    got["unchanged"] = torch.equal(_full(w), before) and not opt.state[w]
    if rank == 0:
        torch.save(got, out)


def _single(name, kw, fused):
    params = [torch.nn.Parameter(p) for p in _params()]
    return _steps(_opt(name, kw, params, fused), params, STEPS)


def _assert_same(got, want, where, exact=True):
    """Params rel 1e-5 every step; codes and block scales equal (exact), else at most 0.1% of the codes one code
    away and the scales rel 1e-5."""
    for step, ((gp, gs), (wp, ws)) in enumerate(zip(got, want)):
        at = f"{where}, step {step + 1}"
        for a, b in zip(gp, wp):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=at)
        for j, (a, b) in enumerate(zip(gs, ws)):
            assert a.keys() == b.keys(), (at, j, a.keys(), b.keys())
            for k in a:
                assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, (at, j, k)
                if exact and (a[k].dtype == torch.uint8 or k.endswith("_absmax")):
                    assert torch.equal(a[k], b[k]), (at, j, k)
                elif a[k].dtype == torch.uint8:
                    off = (a[k].int() - b[k].int()).abs()
                    assert int(off.max()) <= 1 and int((off > 0).sum()) <= 1e-3 * off.numel(), (at, j, k)
                else:
                    torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"{at}, param {j}, {k}")


def test_int8_states_on_shards_match_one_process(tmp_path):
    out = str(tmp_path / "r.pt")
    mp.spawn(_worker, args=(str(tmp_path / "store"), 2, (out,), None, _work), nprocs=2, join=True)
    got = torch.load(out)
    for i, (name, kw, exact) in enumerate(CASES):
        for fused in (False, True):
            want = _single(name, kw, fused)
            _assert_same(got[i, fused], want, f"{name} {kw} fused={fused}", exact)
            # every param-shaped state of the quantized params is int8 (this is the case tested), the (3,) bias fp32
            states = want[-1][1]
            for j, shape in enumerate(SHAPES):
                dtypes = {v.dtype for k, v in states[j].items() if v.shape == shape and not k.endswith("_absmax")}
                assert dtypes == ({torch.uint8} if j < 4 else {torch.float32}), (name, j, dtypes)
            assert float((want[-1][0][0] - _params()[0]).abs().max()) > 1e-3, name  # the params moved (atol 1e-6)
            # on a rank, the states of a DTensor param are DTensors: the codes its shard, the scales its blocks
            for k, kind, shape in got[i, fused, "local"]:
                assert kind == "DTensor", (name, k, kind)
                assert shape == ((32,) if k.endswith("_absmax") else (512, 16)), (name, k, shape)
    r = got["refused"]
    assert "param 0 of param group 0" in r and "(1000, 16)" in r and "int8" in r and "256" in r, r
    assert got["unchanged"]


def _dcp_work(rank, world, ckpt, save, out):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,))
    model = torch.nn.Module()
    params = _sharded(mesh)
    for j, p in enumerate(params):
        model.register_parameter(f"p{j}", p)
    opt = _opt("adamw", dict(lr=0.01, weight_decay=0.1), params, True)
    if save:
        _steps(opt, params, K, mesh=mesh)
        dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=ckpt)
        return
    state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=ckpt)
    model.load_state_dict(state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    got = _steps(opt, params, STEPS - K, start=K, mesh=mesh)
    if rank == 0:
        torch.save(got, out)


def test_int8_dcp_resumes_and_reshards(tmp_path):
    """Saved on 2 ranks after step K, resumed on 2 and 4 ranks and on one process (plain tensors): the codes, the
    scales and the params of the run that never stopped."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    ckpt = str(tmp_path / "ckpt")
    mp.spawn(_worker, args=(str(tmp_path / "s0"), 2, (ckpt, True, None), None, _dcp_work), nprocs=2, join=True)
    want = _single("adamw", dict(lr=0.01, weight_decay=0.1), True)[K:]
    for world in (2, 4):
        out = str(tmp_path / f"r{world}.pt")
        mp.spawn(_worker, args=(str(tmp_path / f"s{world}"), world, (ckpt, False, out), None, _dcp_work),
                 nprocs=world, join=True)
        _assert_same(torch.load(out), want, f"resumed on {world} ranks")
    model = torch.nn.Module()
    params = [torch.nn.Parameter(p) for p in _params()]
    for j, p in enumerate(params):
        model.register_parameter(f"p{j}", p)
    opt = _opt("adamw", dict(lr=0.01, weight_decay=0.1), params, True)
    state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=ckpt)
    model.load_state_dict(state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    _assert_same(_steps(opt, params, STEPS - K, start=K), want, "resumed on one process")
