"""DDP and FSDP2 (fully_shard) with gloo processes on CPU match a single-process run on the full batch, every step.

FSDP2 params are DTensor shards (dim 0, uneven: some ranks hold empty shards). Element-wise optimizers update the
local shards; the reductions (NovoGrad, NvNovoGrad, ..., and max_grad_norm on any optimizer) compute their
per-tensor statistics on the local shards and combine them with one collective (fused_optim/_sharded.py).
One spawn per (mode, world size) runs every case on both paths inside the same process group.
"""
import contextlib
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STEPS = 3
CLIP = 0.05  # below the grads' norm at every step: clipping is active (asserted)

# (registry name, constructor kwargs, the runs: mode-world -> the paths); 4 ranks on 2 CPU cores are slow, so
# they run the cases whose statistics span the shards, on the path that combines them
ALL = {"ddp-2": (False, True), "fsdp2-2": (False, True), "fsdp2-4": (True,)}
CASES = [
    ("adamw", dict(lr=0.01), {"ddp-2": (True,), "fsdp2-2": (False, True)}),
    ("sgd", dict(lr=0.05, momentum=0.9), {"fsdp2-2": (True,)}),
    ("adamw", dict(lr=0.01, max_grad_norm=CLIP), {"fsdp2-2": (False, True), "fsdp2-4": (True,)}),
    ("adamw", dict(lr=0.01, state_dtype=torch.bfloat16), {"fsdp2-2": (False, True)}),
    ("novograd", dict(lr=0.01, weight_decay=0.1), ALL),
    ("nvnovograd", dict(lr=0.01, weight_decay=0.1, decoupled_decay=True, max_grad_norm=CLIP),
     {"fsdp2-2": (False, True), "fsdp2-4": (True,)}),
    # SGDP / AdamP / Adafactor over shards: fused=True runs their kernels (also tests/generic/test_shards_fused.py)
    ("sgdp", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1), {"fsdp2-2": (False, True)}),
    ("adamp", dict(lr=0.01, weight_decay=0.1, caution=True), {"ddp-2": (False,), "fsdp2-2": (False,),
                                                              "fsdp2-4": (False,)}),
    ("adafactor", dict(min_dim_size_to_factor=2, betas=(0.9, 0.99), caution=True, max_grad_norm=CLIP),
     {"fsdp2-2": (False, True), "fsdp2-4": (False,)}),
    ("adafactor", dict(lr=0.01, min_dim_size_to_factor=2), {"fsdp2-2": (False,)}),
    # Lars / Lamb: per-tensor norms (Lamb's caution: the mask's share too) over the shards, both paths
    ("lars", dict(lr=0.5, momentum=0.9, weight_decay=0.1, trust_coeff=0.01), {"fsdp2-2": (False, True)}),
    ("lars", dict(lr=0.01, always_adapt=True, trust_clip=True, trust_coeff=0.02), {"fsdp2-2": (True,)}),
    ("lamb", dict(lr=0.01, weight_decay=0.1), {"fsdp2-2": (False, True)}),
    ("lamb", dict(lr=0.01, caution=True, max_grad_norm=CLIP), {"fsdp2-2": (False, True), "fsdp2-4": (True,)}),
    # caution's mask mean is over each whole tensor: the shards' counts are summed
    ("lion", dict(lr=0.01, weight_decay=0.1, caution=True), {"fsdp2-2": (False, True), "fsdp2-4": (True,)}),
    ("adopt", dict(lr=0.01, decoupled=True, weight_decay=0.1, caution=True), {"fsdp2-2": (False, True)}),
]

# every other optimizer with its defaults, both paths, on 2 FSDP2 ranks (LBFGS and SparseAdam: not for FSDP2;
# Adahessian: refused, see _refusals; Muon: 2-D params only, its own model)
SWEEP = ["adadelta", "adagrad", "adam", "adamax", "adopt", "asgd", "lion", "nadam", "radam", "rmsprop", "rprop"]


class _RowNormLinear(torch.nn.Linear):
    """Each output row's scale cancels: its grad is orthogonal to it (SGDP/AdamP project per channel)."""

    def forward(self, x):
        return torch.nn.functional.linear(x, torch.nn.functional.normalize(self.weight, dim=1), self.bias)


def _model():
    # 20 rows (even over 2 and 4 ranks), 3 rows and 1 row (uneven: some ranks' shards are empty); the layer norm
    # without affine makes the first weight scale invariant as a whole (projected per layer)
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 20, bias=False), torch.nn.LayerNorm(20, elementwise_affine=False),
                               torch.nn.Tanh(), _RowNormLinear(20, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))


def _muon_model():
    # Muon takes matrices only: 20 x 8 (tall: orthogonalized transposed), 3 x 20 (2 + 1 rows on 2 ranks) and
    # 1 x 3 (an empty shard)
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 20, bias=False), torch.nn.Tanh(), torch.nn.Linear(20, 3, bias=False),
                               torch.nn.Tanh(), torch.nn.Linear(3, 1, bias=False))


MUON = dict(lr=0.02, weight_decay=0.1)


@contextlib.contextmanager
def _counted_chains_and_all_to_all():
    """Count the matrices this rank orthogonalizes (a [k, A, B] stack: k) and the all_to_all collectives it issues:
    yields [matrices, all_to_all calls]."""
    from fused_optim.optimizers import muon
    real, real_a2a, count = muon.newton_schulz, dist.all_to_all_single, [0, 0]

    def counted(x, *args, **kw):
        count[0] += x.shape[0] if x.dim() == 3 else 1
        return real(x, *args, **kw)

    def counted_a2a(*args, **kw):
        count[1] += 1
        return real_a2a(*args, **kw)

    muon.newton_schulz, dist.all_to_all_single = counted, counted_a2a
    try:
        yield count
    finally:
        muon.newton_schulz, dist.all_to_all_single = real, real_a2a


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
        if getattr(opt, "last_grad_norm", None) is not None:  # (ZeroRedundancyOptimizer has none)
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
    out["novograd"] = _error_of(opt.step)
    out["novograd unchanged"] = torch.equal(_full(w), before) and not opt.state
    # max_grad_norm needs only sums of squares: any Shard(d) is exact
    grad = w.grad
    want = float(_full(grad).norm())
    for fused in (False, True):
        w.grad = grad.clone()  # (the step writes back the clipped grad)
        opt = fused_optim.REGISTRY["adamw"]([w], lr=0.1, max_grad_norm=1e-3, fused=fused)
        opt.step()
        out["clip norm", fused] = (float(opt.last_grad_norm), want)
    h = torch.nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(0)]))
    h.grad = distribute_tensor(torch.randn(4, 6), mesh, [Shard(0)])
    out["adahessian"] = _error_of(fused_optim.REGISTRY["adahessian"]([h]).step)
    lbfgs = fused_optim.REGISTRY["lbfgs"]([w])
    out["lbfgs"] = _error_of(lambda: lbfgs.step(lambda: (w.grad.zero_(), 0.0)[1]))
    return out


def _error_of(step) -> str:
    """The message a refused step raises, or "no error"."""
    try:
        step()
        return "no error"
    except (NotImplementedError, RuntimeError) as exc:
        return str(exc)


# ZeroRedundancyOptimizer(optimizer_class=ours): each rank steps whole params of its partition (per-tensor
# statistics stay exact); max_grad_norm would see only the partition, so it is refused
ZERO_CASES = [("adamw", dict(lr=0.01), True), ("novograd", dict(lr=0.01), True), ("adamp", dict(lr=0.01), False),
              ("adafactor", dict(min_dim_size_to_factor=2), False)]


def _zero(x, y):
    import fused_optim
    from torch.distributed.optim import ZeroRedundancyOptimizer
    out = {}
    for i, (name, kw, fused) in enumerate(ZERO_CASES):
        model = _wrap(_model(), "ddp")
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=fused_optim.REGISTRY[name], fused=fused,
                                      **kw)
        out[i] = _train(model, opt, x, y)[0]
    try:
        ZeroRedundancyOptimizer(_model().parameters(), optimizer_class=fused_optim.AdamW, max_grad_norm=1.0)
        out["clip"] = "no error"
    except ValueError as exc:
        out["clip"] = str(exc)
    return out


def _rank_work(rank, world, mode, out):
    import fused_optim
    x, y = _data()
    x, y = x.chunk(world)[rank], y.chunk(world)[rank]
    results = {}
    for i, (name, kw, runs) in enumerate(CASES):
        for fused in runs.get(f"{mode}-{world}", ()):
            model = _wrap(_model(), mode)
            opt = fused_optim.REGISTRY[name](model.parameters(), fused=fused, **kw)
            results[i, fused] = _train(model, opt, x, y)
    for name in SWEEP if mode == "fsdp2" and world == 2 else ():
        for fused in (False, True):
            model = _wrap(_model(), mode)
            results[name, fused] = _train(model, fused_optim.REGISTRY[name](model.parameters(), fused=fused), x, y)
    if mode == "ddp":
        results["zero"] = _zero(x, y)
    if mode == "fsdp2" and world == 2:
        results["refusals"] = _refusals()
        for fused in (False, True):  # Newton-Schulz over whole matrices, each on its owner rank
            model = _wrap(_muon_model(), mode)
            with _counted_chains_and_all_to_all() as count:
                results["muon", fused] = _train(model, fused_optim.Muon(model.parameters(), fused=fused, **MUON), x,
                                                y)
            results["muon_ns", fused] = [None] * world
            dist.all_gather_object(results["muon_ns", fused], tuple(count))
    if rank == 0:
        torch.save(results, out)


# ---- DCP: every family's sharded state saved at step K, resumed on 2 and 4 ranks, on 1 process and in the anchor
K, N = 2, 4
# (name, kwargs, fused, resharded onto 4 ranks too: 4 processes on 2 cores are slow, so a few families)
DCP_CASES = [("adamw", dict(lr=0.01), True, True), ("sgd", dict(lr=0.05, momentum=0.9), False, True),
             ("adagrad", dict(lr=0.05), False, False), ("rmsprop", dict(lr=0.01, momentum=0.5), False, False),
             ("adadelta", dict(lr=1.0), False, False), ("adamax", dict(lr=0.01), False, False),
             ("nadam", dict(lr=0.01), False, False), ("radam", dict(lr=0.01), False, False),
             ("asgd", dict(lr=0.01), False, False), ("rprop", dict(lr=0.01), False, False),
             ("novograd", dict(lr=0.01), True, True), ("nvnovograd", dict(lr=0.01), False, False),
             ("sgdp", dict(lr=0.05, momentum=0.9), True, False), ("adamp", dict(lr=0.01), False, True),
             ("adafactor", dict(min_dim_size_to_factor=2, betas=(0.9, 0.99)), True, True),
             ("lion", dict(lr=0.01), False, False), ("adopt", dict(lr=0.01), False, False),
             ("lars", dict(lr=0.5, momentum=0.9, weight_decay=0.1, trust_coeff=0.01), False, False),
             ("lamb", dict(lr=0.01, weight_decay=0.1), False, False), ("muon", MUON, False, True)]


def _dcp_model(name):
    return _muon_model() if name == "muon" else _model()  # Muon takes matrices only


def _dcp_run(model, opt, ckpt, rank, world, *, save: bool):
    """Train to step K and save (save=True), or load the step-K checkpoint; then train to step N."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    x, y = _data()
    x, y = x.chunk(world)[rank], y.chunk(world)[rank]

    def train(steps):
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    if save:
        train(K)
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=ckpt)
    else:
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=ckpt)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
    train(N - K)
    return [_full(p) for p in model.parameters()]


def _dcp_work(rank, world, ckpt_dir, save, out):
    import fused_optim
    results = {}
    for i, (name, kw, fused, on4) in enumerate(DCP_CASES):
        if world == 4 and not on4:
            continue
        model = _wrap(_dcp_model(name), "fsdp2")
        opt = fused_optim.REGISTRY[name](model.parameters(), fused=fused, **kw)
        results[i] = _dcp_run(model, opt, f"{ckpt_dir}/{i}", rank, world, save=save)
    if rank == 0:
        torch.save(results, out)


def _worker(rank, store_path, world, mode, out, work=None):
    from interpreter import patch_language_once_per_launch
    patch_language_once_per_launch()  # (conftest's, which this process does not import)
    # a file store: no TCP port to race for when several test workers run distributed tests at once
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        if work is not None:
            work(rank, world, *mode)
        else:
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


# 4 ranks (the "fsdp2-4" runs of CASES): opt-in (CI time); in CI, 4 ranks run in test_shards_fused.py and the
# DCP resharding test
_FOUR = pytest.mark.skipif(os.environ.get("FUSED_OPTIM_4RANK_TESTS") != "1",
                           reason="4 gloo ranks on 2 cores (CI time): run with FUSED_OPTIM_4RANK_TESTS=1")


@pytest.mark.parametrize("mode,world", [("ddp", 2), ("fsdp2", 2), pytest.param("fsdp2", 4, marks=_FOUR)])
def test_distributed_matches_single_process(tmp_path, mode, world):
    out = str(tmp_path / "results.pt")
    mp.spawn(_worker, args=(str(tmp_path / "store"), world, mode, out), nprocs=world, join=True)
    got = torch.load(out)
    sweep = [(name, {}, {"fsdp2-2": (False, True)}) for name in SWEEP]
    for i, (name, kw, runs) in [*enumerate(CASES), *zip(SWEEP, sweep)]:
        for fused in runs.get(f"{mode}-{world}", ()):
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
    if mode == "ddp":
        zero = got["zero"]
        for i, (name, kw, fused) in enumerate(ZERO_CASES):
            for step, (a_list, b_list) in enumerate(zip(zero[i], _single(name, kw, fused)[0])):
                for a, b in zip(a_list, b_list):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"ZeRO {name}, step {step + 1}")
        assert "ZeroRedundancyOptimizer" in zero["clip"] and "max_grad_norm" in zero["clip"], zero["clip"]
    if mode == "fsdp2" and world == 2:
        r = got["refusals"]
        assert "param 1 of param group 0" in r["novograd"] and "Shard(dim=1)" in r["novograd"], r["novograd"]
        for fused in (False, True):
            got_norm, want_norm = r["clip norm", fused]
            assert want_norm > 1 and got_norm == pytest.approx(want_norm, rel=1e-5), (fused, got_norm, want_norm)
        assert r["novograd unchanged"], r
        assert "DTensor" in r["lbfgs"], r["lbfgs"]
        assert "Adahessian" in r["adahessian"] and "DTensor" in r["adahessian"], r["adahessian"]
        _check_muon(got)


def _check_muon(got):
    """Muon over the shards matches one process on the same path (rel 1e-5); the fused path matches the reference
    to its bf16 Newton-Schulz rounding (tests/cases/muon.py's tolerance)."""
    import fused_optim
    for fused in (False, True):
        model = _muon_model()
        want = _train(model, fused_optim.Muon(model.parameters(), fused=fused, **MUON), *_data())[0]
        for step, (a_list, b_list) in enumerate(zip(got["muon", fused][0], want)):
            for a, b in zip(a_list, b_list):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"Muon fused={fused}, step {step + 1}")
    for a, b in zip(got["muon", True][0][-1], got["muon", False][0][-1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-4)
    moved = min(float((a - b.detach()).abs().max()) for a, b in zip(got["muon", False][0][-1],
                                                                   _muon_model().parameters()))
    assert moved > 1e-2, moved  # every matrix moved: the comparisons can fail
    # 3 sharded matrices of 3 shapes, owners round-robin: rank 0 runs 2 chains a step, rank 1 one (not all 3); each
    # rank issues 2 all_to_all per distinct shape and step (the rows to the owner, the result's rows back)
    steps = len(got["muon", False][0])
    for fused in (False, True):
        assert got["muon_ns", fused] == [(2 * steps, 2 * 3 * steps), (steps, 2 * 3 * steps)], got["muon_ns", fused]


def test_projection_cases_project():
    """The model's first two weights are projected (per layer, per channel) at the first step: the SGDP/AdamP cases
    above exercise both decisions over the shards."""
    from fused_optim.optimizers.projection import CHANNEL, LAYER, projection_mode
    model = _model()
    x, y = _data()
    torch.nn.functional.mse_loss(model(x), y).backward()
    modes = [projection_mode(p.detach(), p.grad, 0.1, 1e-8) for p in (model[0].weight, model[3].weight)]
    assert modes == [LAYER, CHANNEL]


def test_dcp_resume_and_reshard(tmp_path):
    """A 2-rank run saved at step K with DCP and resumed gives the params of the run that never stopped: resumed on
    2 ranks, resharded onto 4, on one process (no FSDP), and in the torch/timm anchor on one process."""
    from fused_optim.anchors import anchor
    import fused_optim
    ckpt, full, runs = str(tmp_path / "ckpt"), str(tmp_path / "full.pt"), {}
    mp.spawn(_worker, args=(str(tmp_path / "s0"), 2, (ckpt, True, full), None, _dcp_work), nprocs=2, join=True)
    for world in (2, 4):
        out = str(tmp_path / f"resumed{world}.pt")
        mp.spawn(_worker, args=(str(tmp_path / f"s{world}"), world, (ckpt, False, out), None, _dcp_work),
                 nprocs=world, join=True)
        runs[f"{world} ranks"] = torch.load(out)
    want = torch.load(full)
    for i, (name, kw, fused, _) in enumerate(DCP_CASES):
        cls = fused_optim.REGISTRY[name]
        anchor_cls = anchor(cls.__name__)[0]
        for who, make in (("1 process", lambda ps: cls(ps, fused=fused, **kw)),
                          ("anchor", lambda ps: anchor_cls(ps, **{k: v for k, v in kw.items()}))):
            model = _dcp_model(name)
            runs.setdefault(who, {})[i] = _dcp_run(model, make(model.parameters()), f"{ckpt}/{i}", 0, 1,
                                                   save=False)
        for who, got in runs.items():
            assert i in got or who == "4 ranks", (name, who)
            for a, b in zip(got.get(i, ()), want[i]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name}: {who}")
        moved = max(float((a - b).abs().max()) for a, b in zip(want[i], _dcp_model(name).parameters()))
        assert moved > 1e-3, name  # the run went somewhere: the comparison can fail


_GPT = """model: {vocab: 32, d_model: 16, n_layers: 1, n_heads: 2, seq_len: 8}
train: {steps: 4, batch: 4, seed: 0}
optimizer: {optimizer: novograd, lr: 1.0e-2, weight_decay: 0.1, max_grad_norm: 0.5, fused: false}
"""


@pytest.mark.skipif(os.environ.get("FUSED_OPTIM_TORCHRUN_TESTS") != "1",
                    reason="three torchrun jobs (CI time): run with FUSED_OPTIM_TORCHRUN_TESTS=1")
def test_train_gpt_fsdp_saves_and_resumes(tmp_path):
    """examples/train_gpt.py --fsdp on 2 gloo ranks: a run stopped after a DCP save at step 2 and resumed prints the
    losses of the run that never stopped."""
    import subprocess
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    cfg = tmp_path / "gpt.yaml"
    cfg.write_text(_GPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.abspath(root),
                                                                    os.environ.get("PYTHONPATH")])))

    def run(steps, ckpt):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               os.path.join(root, "examples", "train_gpt.py"), str(cfg), "--fsdp", "--steps", str(steps),
               "--save-every", "2", "--checkpoint", str(ckpt)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return [line for line in out.stdout.splitlines() if line.startswith("step")]

    whole = run(4, tmp_path / "a")
    assert len(whole) == 4
    assert run(2, tmp_path / "b") == whole[:2]
    resumed = run(4, tmp_path / "b")  # starts from the step-2 checkpoint
    assert len(resumed) == 2
    for a, b in zip(resumed, whole[2:]):
        assert a.split()[1] == b.split()[1] and float(a.split()[3]) == pytest.approx(float(b.split()[3]), rel=1e-5)
