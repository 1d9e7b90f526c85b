"""LBFGS beyond the generic tests: trajectories against torch on several problems (with and without the strong
Wolfe line search), closure-call counts, state layout, checkpoints mid-history, and errors."""

import pytest
import torch

import fused_optim
from helpers import saved

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def rosenbrock(x):
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


# ---- problems: make(dtype, device) -> (list of params, loss(params) -> scalar) ------------------------------------
def _rosen(n):
    def make(dtype, device="cpu"):
        x = torch.tensor([-1.2, 1.0] * (n // 2) + [-1.2] * (n % 2), dtype=dtype, device=device)
        return [x], lambda ps: rosenbrock(ps[0])
    return make


def _logreg(dtype, device="cpu"):
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(64, 5, generator=gen, dtype=torch.float64)
    noise = 0.3 * torch.randn(64, generator=gen, dtype=torch.float64)
    y = X @ torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64) + noise > 0
    X, y = X.to(device, dtype), y.to(device, dtype)
    w, b = torch.zeros(5, dtype=dtype, device=device), torch.zeros(1, dtype=dtype, device=device)
    return [w, b], lambda ps: torch.nn.functional.binary_cross_entropy_with_logits(X @ ps[0] + ps[1], y) + \
        1e-3 * (ps[0] ** 2).sum()


def _mlp(dtype, device="cpu"):
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(32, 4, generator=gen, dtype=torch.float64).to(device, dtype)
    y = torch.sin(X.sum(1, keepdim=True))
    ps = [(torch.randn(s, generator=gen, dtype=torch.float64) * 0.5).to(device, dtype)
          for s in ((16, 4), (16,), (1, 16), (1,))]
    return ps, lambda ps: ((torch.tanh(X @ ps[0].T + ps[1]) @ ps[2].T + ps[3] - y) ** 2).mean()


PROBLEMS = {"rosen2": _rosen(2), "rosen5": _rosen(5), "rosen40": _rosen(40), "logreg": _logreg, "mlp": _mlp}
SEARCHES = {"fixed": {"lr": 0.2, "history_size": 10}, "strong_wolfe": {"line_search_fn": "strong_wolfe"}}


def _closure(opt, params, loss_fn, counter):
    def closure():
        counter[0] += 1
        opt.zero_grad()
        loss = loss_fn(params)
        loss.backward()
        return loss
    return closure


def _pair(problem, kw, dtype, problems=PROBLEMS, **ours):
    """Ours (with the extra keywords `ours`) and torch's LBFGS on equal copies of a problem's params."""
    ps, loss_fn = problems[problem](dtype)
    a = [p.clone().requires_grad_() for p in ps]
    b = [p.clone().requires_grad_() for p in ps]
    return fused_optim.LBFGS(a, **ours, **kw), a, torch.optim.LBFGS(b, **kw), b, loss_fn


def _step_both(ours, a, theirs, b, loss_fn, rtol=0.0, atol=0.0):
    ca, cb = [0], [0]
    la = ours.step(_closure(ours, a, loss_fn, ca))
    lb = theirs.step(_closure(theirs, b, loss_fn, cb))
    assert ca == cb, f"closure calls: ours {ca[0]}, torch {cb[0]}"
    # step returns the first evaluation's loss, as torch does
    torch.testing.assert_close(la.detach(), lb.detach(), rtol=rtol, atol=atol)
    return ca[0]


@pytest.mark.parametrize("search", SEARCHES)
@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_trajectory_matches_torch(problem, search, dtype):
    ours, a, theirs, b, loss_fn = _pair(problem, SEARCHES[search], dtype)
    total = 0
    for _ in range(6):
        total += _step_both(ours, a, theirs, b, loss_fn)
        for p, q in zip(a, b):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-12)
    assert total > 6  # the inner iterations ran
    sa, sb = ours.state[a[0]], theirs.state[b[0]]
    assert sa["func_evals"] == sb["func_evals"] and sa["n_iter"] == sb["n_iter"]


def _types(v):
    return [_types(x) for x in v] if isinstance(v, list) else type(v)


@pytest.mark.parametrize("search", SEARCHES)
def test_state_layout_is_torchs(search):
    """Same keys, same Python types (ints, floats, 0-d tensors, lists of tensors / None) and shapes as torch."""
    ours, a, theirs, b, loss_fn = _pair("mlp", {**SEARCHES[search], "history_size": 3, "max_iter": 4}, torch.float64)
    for _ in range(3):
        _step_both(ours, a, theirs, b, loss_fn)
    assert list(ours.state) == [a[0]]  # the global state lives under the first param only
    sa, sb = ours.state_dict()["state"], theirs.state_dict()["state"]
    assert list(sa) == list(sb) == [0]
    assert sorted(sa[0]) == sorted(sb[0])
    for k, v in sb[0].items():
        assert _types(sa[0][k]) == _types(v), k
        if isinstance(v, torch.Tensor):
            assert sa[0][k].shape == v.shape and sa[0][k].dtype == v.dtype, k
    assert ours.state_dict()["param_groups"][0].keys() - theirs.state_dict()["param_groups"][0].keys() == {"fused"}


def _resumed(direction, ours, a, theirs, b, kw, **ours_kw):
    """One side continued from a real checkpoint of it, in _step_both's order: (ours, params, torch, params).
    direction: torch_to_ours (a fresh ours loads torch's), ours_to_torch, ours_to_ours."""
    src, src_params = (theirs, b) if direction == "torch_to_ours" else (ours, a)
    fresh = [p.detach().clone().requires_grad_() for p in src_params]
    loaded = (torch.optim.LBFGS(fresh, **kw) if direction == "ours_to_torch"
              else fused_optim.LBFGS(fresh, **ours_kw, **kw))
    loaded.load_state_dict(saved(src.state_dict()))
    return (loaded, fresh, src, src_params) if direction == "torch_to_ours" else (src, src_params, loaded, fresh)


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
@pytest.mark.parametrize("search", SEARCHES)
def test_checkpoint_mid_history(direction, search):
    kw = {**SEARCHES[search], "history_size": 4}
    ours, a, theirs, b, loss_fn = _pair("mlp", kw, torch.float64)
    for _ in range(2):
        _step_both(ours, a, theirs, b, loss_fn)
    pairs = _resumed(direction, ours, a, theirs, b, kw)
    for _ in range(3):
        _step_both(*pairs, loss_fn)
    for p, q in zip(pairs[1], pairs[3]):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=0)


def test_complex_missing_and_sparse_grads_like_torch():
    check_complex_missing_and_sparse_grads()


def check_complex_missing_and_sparse_grads(device="cpu", fused=None, rtol=1e-12, atol=0.0):
    """Complex params count as real pairs; a param without a grad contributes zeros, a sparse grad its dense form.
    (test_lbfgs_fused.py runs it on the fused path.)"""
    def make():
        torch.manual_seed(4)
        z = torch.randn(3, dtype=torch.complex128).to(device).requires_grad_()
        unused = torch.randn(2, dtype=torch.float64).to(device).requires_grad_()
        emb = torch.nn.Embedding(5, 2, sparse=True, dtype=torch.float64).to(device)
        return [z, unused, emb.weight], emb

    (pa, ea), (pb, eb) = make(), make()
    target = torch.tensor([1 + 2j, -1j, 0.5], dtype=torch.complex128, device=device)
    idx = torch.tensor([0, 3, 3], device=device)

    def loss_fn(ps, emb):
        return ((ps[0] - target).abs() ** 2).sum() + ((emb(idx) - 1) ** 2).sum()

    ours = fused_optim.LBFGS(pa, line_search_fn="strong_wolfe", fused=fused)
    theirs = torch.optim.LBFGS(pb, line_search_fn="strong_wolfe")
    for _ in range(3):
        ca, cb = [0], [0]
        ours.step(_closure(ours, pa, lambda ps: loss_fn(ps, ea), ca))
        theirs.step(_closure(theirs, pb, lambda ps: loss_fn(ps, eb), cb))
        assert ca == cb
        for p, q in zip(pa, pb):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=rtol, atol=atol)


def test_already_optimal_returns_after_one_evaluation():
    ours, a, theirs, b, _ = _pair("rosen2", {}, torch.float64)
    for p, q in zip(a, b):
        p.data.fill_(1.0)
        q.data.fill_(1.0)  # Rosenbrock's minimum: zero grad
    _step_both(ours, a, theirs, b, lambda ps: rosenbrock(ps[0]))
    assert ours.state[a[0]] == theirs.state[b[0]] == {"func_evals": 1, "n_iter": 0}


def test_tensor_lr_and_tight_budgets():
    ours, a, theirs, b, loss_fn = _pair("rosen5", {"lr": torch.tensor(0.5), "max_iter": 3, "max_eval": 4,
                                                   "line_search_fn": "strong_wolfe"}, torch.float64)
    for _ in range(4):
        assert _step_both(ours, a, theirs, b, loss_fn) <= 4
    torch.testing.assert_close(a[0].detach(), b[0].detach(), rtol=1e-12, atol=0)


def test_errors():
    p = [torch.nn.Parameter(torch.randn(3))]
    opt = fused_optim.LBFGS(p)
    with pytest.raises(RuntimeError, match="requires a closure"):
        opt.step()
    with pytest.raises(ValueError, match="parameter groups"):
        fused_optim.LBFGS([{"params": p}, {"params": [torch.nn.Parameter(torch.randn(2))]}])
    with pytest.raises(ValueError, match="parameter groups"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))]})
    assert len(opt.param_groups) == 1
    for kw, name in [({"lr": -1.0}, "lr"), ({"max_iter": 0}, "max_iter"), ({"max_eval": 0}, "max_eval"),
                     ({"history_size": 0}, "history_size"), ({"tolerance_grad": -1.0}, "tolerance_grad"),
                     ({"tolerance_change": float("nan")}, "tolerance_change"),
                     ({"line_search_fn": "armijo"}, "line_search_fn")]:
        with pytest.raises(ValueError, match=name):
            fused_optim.LBFGS(p, **kw)
    with pytest.raises(RuntimeError, match="requires a closure"):  # the fused path too (test_lbfgs_fused.py)
        fused_optim.LBFGS(p, fused=True).step()
    assert fused_optim.LBFGS(p).param_groups[0]["max_eval"] == 25  # torch's default: max_iter * 5 // 4
