"""LBFGS's fused path (fused=True) against torch.optim.LBFGS: trajectories and closure-call counts (float64 within
1e-6 relative after every step), host syncs per iteration, checkpoints both ways, and the direction kernel against
its torch-op twin.

Everything runs on DEVICE (conftest). Without CUDA the fused path runs on CPU: the direction kernel under
TRITON_INTERPRET (slow, so on small cases), the wider matrix with ``DIRECTION = "torch"`` (the kernel's contract in
torch ops, also sync-free); everything else (flat buffers, ring, speculative directions, batched host decisions,
state views) is the same code either way. The interpreter runs one program, so the kernel's cross-program
reduction and grid barrier only run on a GPU (test_kernel_matches_torch_ops adds a 300k-element case there).

Where the matrix stops early (``STEPS``): from there torch itself moves more than 1e-6 away from its own trajectory
when its start is perturbed by 1e-15 (rounding-level chaos: fixed-step Rosenbrock, rosen40's line search), so only
bit-identical arithmetic could follow it; the fused path's dots round differently (fp64 accumulation, other order).
"""
import contextlib
import copy
import functools
import math
import sys

import numpy as np
import pytest
import torch

import fused_optim
from conftest import DEVICE
from fused_optim.kernels import lbfgs as KL
from fused_optim.kernels import runtime
from fused_optim.optimizers import lbfgs as L
from fused_optim.optimizers import lbfgs_history as LH
from fused_optim.optimizers import lbfgs_search as LS
import test_lbfgs
from test_lbfgs import SEARCHES, _closure, _types

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# test_lbfgs.py's problems, on DEVICE
PROBLEMS = {name: functools.partial(make, device=DEVICE) for name, make in test_lbfgs.PROBLEMS.items()}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny problems: intra-op threads only add contention on shared cores (an MLP backward goes 20x slower)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def torch_ops(monkeypatch):
    monkeypatch.setattr(L, "DIRECTION", "torch")


_pair = functools.partial(test_lbfgs._pair, problems=PROBLEMS, fused=True)
_step_both = functools.partial(test_lbfgs._step_both, rtol=1e-6, atol=1e-12)


def _run(problem, kw, steps, dtype=torch.float64, rtol=1e-6, states=True):
    ours, a, theirs, b, loss_fn = _pair(problem, kw, dtype)
    for _ in range(steps):
        _step_both(ours, a, theirs, b, loss_fn)
        for p, q in zip(a, b):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=rtol, atol=rtol * 1e-6)
        sa, sb = ours.state[a[0]], theirs.state[b[0]]
        assert (sa["func_evals"], sa["n_iter"]) == (sb["func_evals"], sb["n_iter"])
        if states:
            _assert_state_close(sa, sb)
    return ours, a, theirs, b, loss_fn


def _assert_state_close(sa, sb, tol=1e-2):
    """The whole state (history lists oldest first, al, d, t, H_diag, prev_flat_grad, prev_loss): same keys and
    types, values normwise within 1e-2 (relative, with a 1e-8 floor). Not tighter: near convergence g, d,
    y = g - g_prev and the curvature scalars are small differences of large numbers (Rosenbrock's Hessian has
    condition ~1e3), so a 1e-8 difference in params is a 1e-3 one in them; a misplaced or missing history entry
    is off by O(1)."""
    assert sorted(sa) == sorted(sb)
    for k, vb in sb.items():
        va = sa[k]
        assert _types(va) == _types(vb), k
        if isinstance(vb, list):
            va, vb = [x for x in va if x is not None], [x for x in vb if x is not None]
            if not vb:
                continue
            va, vb = torch.stack(va), torch.stack(vb)
        if isinstance(vb, torch.Tensor):
            assert va.shape == vb.shape and va.dtype == vb.dtype, k
            err = (va - vb).norm() / (vb.norm() + 1e-6)  # |a - b| <= 1e-2 |b| + 1e-8
            assert err <= tol, f"state {k!r}: normwise error {err:.2e}"
        elif isinstance(vb, float):
            assert abs(va - vb) <= tol * abs(vb), k
        else:
            assert va == vb, k


# steps per (problem, search) before rounding-level chaos (see the module docstring)
STEPS = {("rosen2", "fixed"): 3, ("rosen40", "fixed"): 4, ("rosen40", "strong_wolfe"): 1}


@pytest.mark.parametrize("search", SEARCHES)
@pytest.mark.parametrize("problem", PROBLEMS)
def test_trajectory_matches_torch_f64(torch_ops, problem, search):
    _run(problem, SEARCHES[search], STEPS.get((problem, search), 6))


@pytest.mark.parametrize("problem,kw,steps", [
    ("rosen5", {"lr": 0.2, "history_size": 3, "max_iter": 6}, 3),    # the ring wraps (~17 pairs, 4 rows)
    ("mlp", {"line_search_fn": "strong_wolfe", "history_size": 3, "max_iter": 5}, 2),
], ids=["rosen5-fixed", "mlp-strong_wolfe"])
def test_trajectory_matches_torch_kernel(problem, kw, steps):
    """The Triton direction kernel itself (on CPU: interpreted, so small cases)."""
    _run(problem, kw, steps)


def test_refused_cooperative_launch_falls_back(monkeypatch):
    """A device that refuses the direction kernel's cooperative launch (the interpreter refuses any grid of 2
    programs; on CUDA the refusal is simulated) gets the torch-op direction: torch's trajectory, and after the one
    refusal no step tries the kernel again on that device."""
    monkeypatch.setattr(KL, "grid_size", lambda n, device: 2)
    monkeypatch.setattr(runtime, "refused_devices", set())
    tries, launch = [], runtime.launch

    def refusing_launch(kernel, grid, *args, cooperative=False, **kw):
        tries.append((grid, cooperative))
        if cooperative and not runtime.interpreter_enabled():
            raise runtime.CooperativeLaunchRefused("simulated")
        return launch(kernel, grid, *args, cooperative=cooperative, **kw)

    monkeypatch.setattr(runtime, "launch", refusing_launch)
    ours, a, _, _, _ = _run("rosen5", {"lr": 0.2, "history_size": 3, "max_iter": 6}, 3)
    assert tries == [(2, True)]
    assert runtime.refused_devices == {str(a[0].device)}
    assert ours.state[a[0]]["n_iter"] > 3  # directions after the first iteration were computed


@pytest.mark.parametrize("problem,search", [("rosen40", "fixed"), ("logreg", "strong_wolfe"), ("mlp", "strong_wolfe")])
def test_trajectory_f32(torch_ops, problem, search):
    """float32: the line search's host arithmetic is float32 like torch's 0-d tensors (numpy scalars), so closure
    counts agree; dots round differently from torch's float32 ones (and torch's own 1-ulp perturbations move
    ~1e-5 within one step here), hence 1e-4."""
    _run(problem, {**SEARCHES[search], "max_iter": 10}, 1, dtype=torch.float32, rtol=1e-4, states=False)


# ---- host syncs --------------------------------------------------------------------------------------------------
_SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


@contextlib.contextmanager
def count_syncs():
    """Counts device -> host reads (Tensor.item / tolist / bool / float / int / cpu / numpy) from outside triton (the
    interpreter reads its arguments on the host by design)."""
    calls = []
    saved = {m: torch.Tensor.__dict__.get(m) for m in _SYNCS}

    def wrap(name, fn):
        def counted(self, *args, **kwargs):
            if not sys._getframe(1).f_globals.get("__name__", "").startswith("triton"):
                calls.append(name)
            return fn(self, *args, **kwargs)
        return counted

    for m in _SYNCS:
        setattr(torch.Tensor, m, wrap(m, getattr(torch.Tensor, m)))
    try:
        yield calls
    finally:
        for m, fn in saved.items():
            if fn is None:
                delattr(torch.Tensor, m)
            else:
                setattr(torch.Tensor, m, fn)


@pytest.mark.parametrize("direction", ["torch", "triton"])
@pytest.mark.parametrize("search", ["fixed", "strong_wolfe"])
def test_host_syncs_per_iteration(monkeypatch, direction, search):
    """fixed step: 1 sync per iteration; strong_wolfe: 1 per line-search evaluation + 1 per iteration after the
    first; every one of them is a single transfer (one .tolist())."""
    monkeypatch.setattr(L, "DIRECTION", direction)
    kw = {"lr": 0.05, "history_size": 3, "max_iter": 5} if search == "fixed" else \
        {"line_search_fn": "strong_wolfe", "history_size": 3, "max_iter": 4}
    ps, loss_fn = PROBLEMS["mlp"](torch.float64)
    ps = [p.clone().requires_grad_() for p in ps]
    opt = fused_optim.LBFGS(ps, fused=True, **kw)
    for _ in range(2 if direction == "triton" else 3):
        calls, n_iter0, counted0 = [0], opt.state[ps[0]].get("n_iter", 0), opt.host_syncs
        closure = _closure(opt, ps, loss_fn, calls)
        with count_syncs() as syncs:
            opt.step(closure)
        iters = opt.state[ps[0]]["n_iter"] - n_iter0
        assert set(syncs) == {"tolist"} and len(syncs) == opt.host_syncs - counted0
        if search == "fixed":
            assert iters == kw["max_iter"] and len(syncs) == calls[0] == iters  # one per iteration
        else:
            assert iters == kw["max_iter"] and len(syncs) == calls[0] + iters - 1


# ---- checkpoints and state ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", ["ours_to_torch", "torch_to_ours", "ours_to_ours"])
@pytest.mark.parametrize("search", SEARCHES)
def test_checkpoint_both_ways(torch_ops, direction, search):
    kw = {**SEARCHES[search], "history_size": 5, "max_iter": 9}
    ours, a, theirs, b, loss_fn = _run("mlp", kw, 3)  # ~26 pairs through 6 ring rows: the ring has wrapped
    assert ours.device_history.head != 0
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert sorted(sd_ours["state"][0]) == sorted(sd_theirs["state"][0])
    for k, v in sd_theirs["state"][0].items():
        assert _types(sd_ours["state"][0][k]) == _types(v), k
        if isinstance(v, torch.Tensor):
            assert (sd_ours["state"][0][k].dtype, sd_ours["state"][0][k].shape) == (v.dtype, v.shape), k
    pairs = test_lbfgs._resumed(direction, ours, a, theirs, b, kw, fused=True)
    for _ in range(3):
        _step_both(*pairs, loss_fn)
        for p, q in zip(pairs[1], pairs[3]):  # ours -> ours: the same arithmetic on the same numbers (only MKL's
            # alignment-dependent dot order differs: the reloaded ring starts at row 0)
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-10 if direction == "ours_to_ours" else 1e-6,
                                       atol=1e-14 if direction == "ours_to_ours" else 1e-12)


def test_state_dict_is_a_snapshot(torch_ops):
    """The fused state holds views of ring buffers that later steps overwrite: state_dict() copies them."""
    ours, a, _, _, loss_fn = _run("rosen5", {"lr": 0.2, "history_size": 2, "max_iter": 4}, 2)
    sd = ours.state_dict()
    before = copy.deepcopy(sd)
    ours.step(_closure(ours, a, loss_fn, [0]))
    assert_states_equal = lambda x, y: torch.testing.assert_close(x, y, rtol=0, atol=0)
    for k, v in before["state"][0].items():
        if isinstance(v, list):
            for x, y in zip(v, sd["state"][0][k]):
                if x is not None:
                    assert_states_equal(x, y)
        elif isinstance(v, torch.Tensor):
            assert_states_equal(v, sd["state"][0][k])


def test_switching_paths_mid_run(torch_ops):
    """fused -> reference -> fused on one optimizer: each path takes the state the other left."""
    ours, a, theirs, b, loss_fn = _run("mlp", {"lr": 0.2, "history_size": 5, "max_iter": 10}, 2)
    for fused in (False, True, True):
        ours.param_groups[0]["fused"] = fused
        _step_both(ours, a, theirs, b, loss_fn)
        for p, q in zip(a, b):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-12)


def test_complex_missing_and_sparse_grads(torch_ops):
    test_lbfgs.check_complex_missing_and_sparse_grads(DEVICE, fused=True, rtol=1e-10, atol=1e-14)


def test_already_optimal_and_tensor_lr(torch_ops):
    ours, a, theirs, b, loss_fn = _pair("rosen2", {}, torch.float64)
    for p, q in zip(a, b):
        p.data.fill_(1.0)
        q.data.fill_(1.0)
    _step_both(ours, a, theirs, b, loss_fn)
    assert ours.state[a[0]] == theirs.state[b[0]] == {"func_evals": 1, "n_iter": 0}
    _run("rosen5", {"lr": torch.tensor(0.5), "max_iter": 3, "max_eval": 4, "line_search_fn": "strong_wolfe"}, 4)
    _run("rosen5", {"lr": torch.tensor([0.1]), "max_iter": 5, "history_size": 3}, 2)  # float32 t: torch's rounding


# ---- the kernel against its torch-op twin --------------------------------------------------------------------------
@pytest.mark.parametrize("n", [37] + ([300_000] if DEVICE == "cuda" else []))  # CUDA: many programs + barriers
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", ["empty", "partial", "full_evicts", "rejected"])
def test_kernel_matches_torch_ops(dtype, case, n):
    """One direction update, every output (direction, pair, rho, ring meta, H_diag, al, [kept, g.d, max|d|])."""
    H = 3
    gen = torch.Generator().manual_seed(7)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    count = {"empty": 0, "partial": 2, "full_evicts": 3, "rejected": 2}[case]
    head = 2 if case == "full_evicts" else 0  # a wrapped ring
    S = rnd(H + 1, n) * 0.1
    Y = S * 2 + rnd(H + 1, n) * 0.01  # positive curvature
    d, pg = rnd(n), rnd(n)
    g = pg - 0.5 * d if case == "rejected" else pg + 0.5 * d + rnd(n) * 0.01  # y.s < 0 / > 0
    devs = []
    for impl in ("triton", "torch"):
        dev = LH.DeviceHistory(n, H, dtype, torch.device(DEVICE))
        for i in range(count):
            r = (head + i) % (H + 1)
            dev.S[r], dev.Y[r] = S[r], Y[r]
            dev.rho[r] = 1 / Y[r].dot(S[r])
        dev.head, dev.count = head, count
        dev.meta_head[0], dev.meta_count[0] = head, count
        dev.hd[0] = 0.7
        dev.d[0], dev.pg[0] = d, pg
        dev.direction(g, 0.5, kernel=impl == "triton")
        devs.append(dev)
    k, t = devs
    rtol = 1e-12 if dtype == torch.float64 else 1e-5 if n < 1000 else 1e-4
    close = lambda x, y: torch.testing.assert_close(x, y, rtol=rtol, atol=rtol)
    assert k.kept.item() == t.kept.item() == (0.0 if case == "rejected" else 1.0)
    assert torch.equal(k.meta[1], t.meta[1])
    count = int(t.meta[1, 1])
    close(k.out, t.out)
    close(k.d[1], t.d[1])
    close(k.pg[1], t.pg[1])
    close(k.hd[1], t.hd[1])
    close(k.al[1, :count], t.al[1, :count])
    close(k.Y, t.Y)
    close(k.S, t.S)
    if case != "rejected":
        close(k.rho, t.rho)
    assert k.barrier.words[1].item() == 0  # no barrier failure


# ---- the host stand-ins for torch's 0-d tensors ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_line_search_host_arithmetic_is_torchs(monkeypatch, dtype):
    """strong_wolfe / cubic_minimizer on the host stand-ins (numpy scalars) take exactly the steps they take on
    torch's 0-d tensors: same rounding, same promotions, same branches."""
    hs = LS.host_scalar(dtype)
    gen = torch.Generator().manual_seed(3)
    # torch's CPU sqrt (vectorized) is sometimes 1 ulp off; on the GPU, where the fused path runs, torch's sqrt is
    # IEEE (correctly rounded), as numpy's is: compare against that
    sqrt = LS.host_sqrt
    monkeypatch.setattr(LS, "host_sqrt", lambda x: torch.tensor(math.sqrt(x.item()), dtype=x.dtype)
                        if isinstance(x, torch.Tensor) else sqrt(x))
    for trial in range(60):
        c = torch.randn(4, generator=gen, dtype=torch.float64)
        d0 = 10.0 ** float(torch.randint(-3, 3, (1,), generator=gen))
        t0 = 1.0 if trial % 2 else torch.tensor(0.37, dtype=dtype)  # torch's first t is a 0-d tensor

        def evaluate_with(wrap):
            def evaluate(t):
                t = float(t)  # the line search moves params by float(t), as torch's add_(alpha=t) does
                f = float(c[0] * t ** 4 - c[1].abs() * t ** 2 - t + c[2] * t ** 3)
                slope = (4 * c[0] * t ** 3 - 2 * c[1].abs() * t - 1 + 3 * c[2] * t ** 2) * d0
                return f, t, wrap(slope.to(dtype))
            return evaluate

        runs = []
        for wrap in (lambda x: x, lambda x: hs(x.item())):
            gtd0, d_max = wrap(torch.tensor(-d0, dtype=dtype)), wrap(torch.tensor(d0, dtype=dtype))
            t_init = wrap(t0) if isinstance(t0, torch.Tensor) else t0
            with np.errstate(all="ignore"):  # numpy warns where torch silently overflows to inf
                runs.append(LS.strong_wolfe(evaluate_with(wrap), t_init, d_max, 0.0, 0.0, gtd0, max_ls=25))
        (f1, g1, t1, n1), (f2, g2, t2, n2) = runs
        assert (f1, g1, float(t1), n1) == (f2, g2, float(t2), n2), trial
    for _ in range(500):
        x = torch.randn(6, generator=gen, dtype=torch.float64).mul(10).to(dtype)
        ta = LS.cubic_minimizer(float(x[0]), float(x[1]), x[2], float(x[0]) + 1, float(x[4]), x[5])
        tb = LS.cubic_minimizer(float(x[0]), float(x[1]), hs(x[2].item()), float(x[0]) + 1, float(x[4]),
                               hs(x[5].item()))
        assert float(ta) == float(tb)
        assert isinstance(ta, torch.Tensor) == isinstance(tb, np.generic)


# ---- dispatch and errors -----------------------------------------------------------------------------------------
def test_dispatch_and_errors(monkeypatch):
    p = [torch.nn.Parameter(torch.randn(3, dtype=torch.float64))]
    assert not fused_optim.LBFGS(p)._use_kernel(fused_optim.LBFGS(p).param_groups[0], p)  # CPU: reference
    with pytest.raises(RuntimeError, match="requires a closure"):
        fused_optim.LBFGS(p, fused=True).step()
    half = [torch.nn.Parameter(torch.randn(3, dtype=torch.float16))]
    with pytest.raises(RuntimeError, match="float32 and float64"):
        fused_optim.LBFGS(half, fused=True).step(lambda: half[0].float().sum())
    monkeypatch.setattr(runtime, "interpreter_enabled", lambda: False)
    with pytest.raises(RuntimeError, match="fused=True needs CUDA"):
        fused_optim.LBFGS(p, fused=True)
