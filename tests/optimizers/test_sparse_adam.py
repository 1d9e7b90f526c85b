"""SparseAdam beyond the generic tests: nn.Embedding(sparse=True) training against torch, untouched rows, the rows
kernel, AMP, and errors."""

import pytest
import torch

import fused_optim
from conftest import DEVICE
from helpers import assert_states_close, assert_unchanged, fp32_master, saved, snapshot
from fused_optim.kernels import runtime

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
ROWS, USED = 40, 30  # rows >= USED are never looked up


def _models(dtype, device="cpu", n=2):
    torch.manual_seed(0)
    base = [torch.nn.Embedding(ROWS, 6, sparse=True, dtype=torch.float64),
            torch.nn.Embedding(ROWS, 3, sparse=True, dtype=torch.float64)]
    copy = lambda e: torch.nn.Embedding.from_pretrained(  # noqa: E731
        e.weight.detach().to(dtype).clone(), freeze=False, sparse=True).to(device)
    return [[copy(e) for e in base] for _ in range(n)]


def _groups(embs, config):
    return [{"params": [embs[0].weight]}, {"params": [embs[1].weight], "lr": config.get("lr", 1e-3) * 0.5}]


def _batch(gen):
    # 24 lookups among USED rows: repeats (duplicate COO indices to coalesce) and rows left out
    return torch.randint(0, USED, (24,), generator=gen), torch.randn(24, 1, generator=gen, dtype=torch.float64)


def _backward(embs, idx, target):
    idx = idx.to(embs[0].weight.device)
    out = embs[0](idx).sum(1, keepdim=True) * embs[1](idx).sum(1, keepdim=True)
    ((out - target.to(out)) ** 2).sum().backward()


def _train(opts, models, steps, seed=0, check=None):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx, target = _batch(gen)
        for opt, embs in zip(opts, models):
            opt.zero_grad()
            _backward(embs, idx, target)
            opt.step()
        if check:
            check()


def _params(embs):
    return [e.weight for e in embs]


CONFIGS = [{}, {"lr": 0.01, "betas": (0.8, 0.99), "maximize": True}, {"lr": 0.03, "eps": 1e-6}]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-10, 1e-12), (torch.float32, 1e-6, 1e-7)],
                         ids=["f64", "f32"])
def test_embedding_training_matches_torch(config, dtype, rtol, atol):
    ours_m, theirs_m = _models(dtype)
    ours = fused_optim.SparseAdam(_groups(ours_m, config), fused=False, **config)
    theirs = torch.optim.SparseAdam(_groups(theirs_m, config), **config)
    check = lambda: assert_states_close(ours, _params(ours_m), theirs, _params(theirs_m), rtol, atol)  # noqa: E731
    _train([ours, theirs], [ours_m, theirs_m], 25, check=check)
    st = ours.state[ours_m[0].weight]
    assert type(st["step"]) is int and st["step"] == theirs.state[theirs_m[0].weight]["step"] == 25


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_rows_kernel_matches_reference(config):
    fused_m, ref_m = _models(torch.float32, DEVICE)
    fused = fused_optim.SparseAdam(_groups(fused_m, config), fused=True, **config)
    ref = fused_optim.SparseAdam(_groups(ref_m, config), fused=False, **config)
    n0 = runtime.launch_count
    _train([fused, ref], [fused_m, ref_m], 20)
    assert runtime.launch_count - n0 == 20 * 2  # one launch per group per step
    assert_states_close(fused, _params(fused_m), ref, _params(ref_m), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_untouched_rows_stay_bit_identical(fused):
    (embs,) = _models(torch.float32, DEVICE, n=1)
    before = [w.detach().clone() for w in _params(embs)]
    opt = fused_optim.SparseAdam(_groups(embs, {}), fused=fused)
    _train([opt], [embs], 10)
    for w, w0 in zip(_params(embs), before):
        assert torch.equal(w[USED:], w0[USED:])
        assert not torch.equal(w[:USED], w0[:USED])
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[w][k][USED:], torch.zeros_like(w[USED:]))


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_dense_grad_raises_before_any_change(fused):
    (embs,) = _models(torch.float32, DEVICE, n=1)
    opt = fused_optim.SparseAdam(_groups(embs, {}), fused=fused)
    _train([opt], [embs], 2)
    ps = _params(embs)
    snap = snapshot(opt, ps)
    ps[0].grad = torch.sparse_coo_tensor(torch.tensor([[1, 1]]), torch.ones(2, 6), ps[0].shape).to(DEVICE)
    ps[1].grad = torch.ones_like(ps[1])  # dense, in the second group: the first group must not move either
    with pytest.raises(RuntimeError, match="SparseAdam supports only sparse gradients"):
        opt.step()
    assert_unchanged(opt, ps, snap)


def test_bad_arguments():
    p = [torch.nn.Parameter(torch.randn(3, 2))]
    for kw, name in [({"lr": 0.0}, "learning rate"), ({"lr": -1.0}, "learning rate"), ({"eps": 0.0}, "epsilon"),
                     ({"betas": (1.0, 0.9)}, "index 0"), ({"betas": (0.9, -0.1)}, "index 1")]:
        with pytest.raises(ValueError, match=name):
            fused_optim.SparseAdam(p, **kw)
    with pytest.raises(ValueError, match="complex"):
        fused_optim.SparseAdam([torch.randn(3, dtype=torch.complex64, requires_grad=True)])
    with pytest.raises(ValueError, match="dense parameter"):
        fused_optim.SparseAdam([torch.randn(3, 2).to_sparse().requires_grad_()])


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_empty_and_missing_grads(fused):
    """Like torch: an empty sparse grad advances `step` and changes nothing else; no grad advances nothing."""
    a, b = torch.randn(5, 2, device=DEVICE), torch.randn(4, device=DEVICE)
    ta, tb = a.detach().cpu().clone(), b.detach().cpu().clone()
    ours = fused_optim.SparseAdam([a, b], lr=0.1, fused=fused)
    theirs = torch.optim.SparseAdam([ta, tb], lr=0.1)
    for step in range(4):
        for p, q in ((a, ta), (b, tb)):
            idx = torch.tensor([[0, 3, 0]]) if step % 2 else torch.zeros(1, 0, dtype=torch.long)
            vals = torch.randn((idx.shape[1], *q.shape[1:]))
            q.grad = torch.sparse_coo_tensor(idx, vals, q.shape)
            p.grad = None if (p is b and step == 2) else q.grad.to(DEVICE)
        if step == 2:
            tb.grad = None
        ours.step()
        theirs.step()
        assert ours.state[a]["step"] == theirs.state[ta]["step"]
        assert ours.state[b]["step"] == theirs.state[tb]["step"]
    torch.testing.assert_close(a.cpu(), ta, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.cpu(), tb, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_grad_scale_and_found_inf(fused):
    scaled_m, plain_m = _models(torch.float32, DEVICE)
    scaled = fused_optim.SparseAdam(_groups(scaled_m, {}), lr=0.01, fused=fused)
    plain = fused_optim.SparseAdam(_groups(plain_m, {}), lr=0.01, fused=fused)
    gen = torch.Generator().manual_seed(3)
    scale = torch.tensor(512.0, device=DEVICE)
    for _ in range(3):
        idx, target = _batch(gen)
        for opt, embs in ((scaled, scaled_m), (plain, plain_m)):
            opt.zero_grad()
            _backward(embs, idx, target)
        for w in _params(scaled_m):
            w.grad = w.grad * 512.0
        scaled.step(grad_scale=scale, found_inf=torch.tensor(0.0, device=DEVICE))
        plain.step()
        for w, v in zip(_params(scaled_m), _params(plain_m)):  # p.grad holds the unscaled grad afterwards
            torch.testing.assert_close(w.grad.to_dense(), v.grad.to_dense(), rtol=1e-6, atol=0)
    assert_states_close(scaled, _params(scaled_m), plain, _params(plain_m), rtol=1e-5, atol=1e-6)
    snap = snapshot(scaled, _params(scaled_m))
    scaled.step(grad_scale=scale, found_inf=torch.tensor(1.0, device=DEVICE))
    assert_unchanged(scaled, _params(scaled_m), snap)


def test_grad_scaler_unscales_sparse_grads_itself():
    """torch's GradScaler unscales sparse grads (unscale_) and then calls a plain step(), as with torch's SparseAdam."""
    ours_m, theirs_m = _models(torch.float32)
    ours = fused_optim.SparseAdam(_groups(ours_m, {}), lr=0.01, fused=False)
    theirs = torch.optim.SparseAdam(_groups(theirs_m, {}), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        idx, target = _batch(gen)
        ours.zero_grad()
        out = ours_m[0](idx).sum(1, keepdim=True) * ours_m[1](idx).sum(1, keepdim=True)
        scaler.scale(((out - target.float()) ** 2).sum()).backward()
        scaler.step(ours)
        scaler.update()
        theirs.zero_grad()
        _backward(theirs_m, idx, target)
        theirs.step()
    assert_states_close(ours, _params(ours_m), theirs, _params(theirs_m), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("direction", ["fused_to_torch", "torch_to_fused"])
def test_fused_checkpoint_moves_both_ways(direction):
    fused_m, torch_m = _models(torch.float32, DEVICE), _models(torch.float32)
    fused_m, torch_m = fused_m[0], torch_m[0]
    fused = fused_optim.SparseAdam(_groups(fused_m, {}), lr=0.01, fused=True)
    theirs = torch.optim.SparseAdam(_groups(torch_m, {}), lr=0.01)
    _train([fused, theirs], [fused_m, torch_m], 5)
    src, src_m = (fused, fused_m) if direction == "fused_to_torch" else (theirs, torch_m)
    sd = saved(src.state_dict())
    (new_m,) = _models(torch.float32, DEVICE if direction == "torch_to_fused" else "cpu", n=1)
    for w, w_src in zip(_params(new_m), _params(src_m)):
        w.data.copy_(w_src.detach())
    if direction == "fused_to_torch":
        loaded = torch.optim.SparseAdam(_groups(new_m, {}), lr=0.01)
    else:
        loaded = fused_optim.SparseAdam(_groups(new_m, {}), lr=0.01, fused=True)
    loaded.load_state_dict(sd)
    _train([loaded, src], [new_m, src_m], 5, seed=9)
    assert_states_close(loaded, _params(new_m), src, _params(src_m), rtol=1e-5, atol=1e-6)


def _three_steps(opt_a, a, opt_b, b, grad):
    """Three steps of two optimizers of one param each, on copies of the same grad."""
    for _ in range(3):
        a.grad, b.grad = grad.clone(), grad.clone()
        opt_a.step()
        opt_b.step()


def test_non_contiguous_param():
    """Both paths take any strides (like torch): the rows kernel runs on a contiguous copy, written back."""
    base = torch.randn(4, 7, dtype=torch.float64)
    p, q = base.t(), base.t().clone()  # (7, 4) views with column-major strides
    ours, theirs = fused_optim.SparseAdam([p], lr=0.1, fused=False), torch.optim.SparseAdam([q], lr=0.1)
    g = torch.sparse_coo_tensor(torch.tensor([[1, 5, 1]]), torch.randn(3, 4, dtype=torch.float64), (7, 4))
    _three_steps(ours, p, theirs, q, g)
    torch.testing.assert_close(p, q, rtol=1e-12, atol=0)
    if DEVICE == "cpu":
        f, r = base.float().t(), base.float().t().contiguous()
        fused, ref = fused_optim.SparseAdam([f], fused=True), fused_optim.SparseAdam([r], fused=False)
        _three_steps(fused, f, ref, r, g.float())
        assert not f.is_contiguous() and fused.state[f]["exp_avg"].stride() == f.stride()
        assert_states_close(fused, [f], ref, [r], rtol=1e-6, atol=1e-7)



# the precision options: an exact fp32 master (a copy, or the bf16 param with its remainder), bf16 states, and
# stochastic rounding of the param or the states (random bits differ between the paths: compared by distance)
LEAN = [(torch.bfloat16, dict(master_weights=True)), (torch.bfloat16, dict(param_remainders=True)),
        (torch.float32, dict(state_dtype=torch.bfloat16)),
        (torch.bfloat16, dict(param_remainders=True, state_dtype=torch.bfloat16, stochastic_rounding=True)),
        (torch.bfloat16, dict(master_weights=True, stochastic_rounding=True))]


@pytest.mark.parametrize("dtype,options", LEAN, ids=[str(o) for _, o in LEAN])
def test_rows_kernel_precision_options_match_reference(dtype, options):
    """The rows kernel runs the precision options in its one launch per group, the rows absent from every grad
    untouched bit for bit; the fp32 masters match the reference's to fp32 rounding (round to nearest), or stay
    within a small share of the distance travelled (stochastic rounding)."""
    config = {"lr": 0.01}
    fused_m, ref_m = _models(dtype, DEVICE)
    start = [e.weight.detach().float().clone() for e in ref_m]
    fused = fused_optim.SparseAdam(_groups(fused_m, config), fused=True, **config, **options)
    ref = fused_optim.SparseAdam(_groups(ref_m, config), fused=False, **config, **options)
    untouched = [e.weight.detach()[USED:].clone() for e in fused_m]
    n0 = runtime.launch_count
    _train([fused, ref], [fused_m, ref_m], 20)
    assert runtime.launch_count - n0 == 20 * 2  # one launch per group per step
    for a, b, w0, rest in zip(_params(fused_m), _params(ref_m), start, untouched):
        assert torch.equal(a[USED:], rest)
        wa, wb = fp32_master(fused, a), fp32_master(ref, b)
        if options.get("stochastic_rounding"):
            moved = float((wb - w0).abs().max())
            assert moved > 1e-2 and float((wa - wb).abs().max()) <= 0.05 * moved
            continue
        torch.testing.assert_close(wa, wb, rtol=1e-5, atol=1e-6)
        for k in ("exp_avg", "exp_avg_sq"):
            assert fused.state[a][k].dtype == ref.state[b][k].dtype
            torch.testing.assert_close(fused.state[a][k].float(), ref.state[b][k].float(), rtol=2 ** -7, atol=1e-7)


def _int8_models(dtype, n=2):
    """Embeddings of 256 and 512 columns (rows of whole 256-blocks: the rows kernel) and one of 6 (its blocks span
    rows: the reference), the last two in one group."""
    torch.manual_seed(0)
    base = [torch.randn(ROWS, d).to(dtype) for d in (256, 512, 6)]
    return [[torch.nn.Embedding.from_pretrained(w.clone(), freeze=False, sparse=True).to(DEVICE) for w in base]
            for _ in range(n)]


@pytest.mark.parametrize("dtype,options", [(torch.float32, {}), (torch.bfloat16, dict(param_remainders=True))],
                         ids=["fp32", "bf16-remainders"])
def test_int8_rows_kernel_matches_reference(dtype, options):
    """int8 states: params whose rows are whole 256-blocks are updated by the rows kernel, one launch per group,
    each present row's blocks requantized on their own; a param whose blocks span rows goes to the reference within
    the same step. The codes and scales are the reference's (which requantizes the whole tensor): exact under the
    interpreter, off by one code on at most 0.1% of elements on a GPU (FMA), and the rows absent from every grad
    keep their codes, scales and params bit for bit."""
    fused_m, ref_m = _int8_models(dtype)
    kw = dict(lr=0.01, state_dtype="int8", int8_min_numel=16, **options)
    groups = lambda embs: [{"params": [embs[0].weight]}, {"params": [embs[1].weight, embs[2].weight]}]  # noqa: E731
    fused, ref = fused_optim.SparseAdam(groups(fused_m), fused=True, **kw), fused_optim.SparseAdam(groups(ref_m), **kw)
    gen = torch.Generator().manual_seed(3)
    before = None
    n0 = runtime.launch_count
    for step in range(6):
        idx = torch.randint(0, USED, (24,), generator=gen).to(DEVICE)  # repeats, and rows >= USED never looked up
        for opt, embs in ((fused, fused_m), (ref, ref_m)):
            opt.zero_grad()
            (sum(e(idx).pow(2).sum(1) for e in embs) * torch.linspace(-1, 2, 24, device=DEVICE)).sum().backward()
            opt.step()
        if step == 0:
            before = [(e.weight.detach()[USED:].clone(), {k: v.clone() for k, v in fused.state[e.weight].items()
                                                           if torch.is_tensor(v)}) for e in fused_m]
    assert runtime.launch_count - n0 == 6 * 2  # the 6-column param adds no launch
    for a, b, (rest, st0) in zip(_params(fused_m), _params(ref_m), before):
        sa, sb = fused.state[a], ref.state[b]
        assert sa.keys() == sb.keys() and sa["exp_avg"].dtype == sa["exp_avg_sq"].dtype == torch.uint8
        for k in ("exp_avg", "exp_avg_sq"):
            off = (sa[k].int() - sb[k].int()).abs()
            assert off.max() <= (0 if DEVICE == "cpu" else 1) and off.float().mean() <= 1e-3, k
            torch.testing.assert_close(sa[k + "_absmax"], sb[k + "_absmax"], rtol=0 if DEVICE == "cpu" else 1e-6,
                                       atol=0)
        assert sa["exp_avg_absmax"].shape == ((ROWS, a.shape[1] // 256) if a.shape[1] % 256 == 0 else (1,))
        torch.testing.assert_close(fp32_master(fused, a), fp32_master(ref, b), rtol=1e-5, atol=1e-6)
        assert torch.equal(a.detach()[USED:], rest)
        if a.shape[1] % 256 == 0:  # the rows kernel writes only the present rows' codes and scales
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(sa[k][USED:], st0[k][USED:])
                assert torch.equal(sa[k + "_absmax"][USED:], st0[k + "_absmax"][USED:])
