"""Memory-lean params and states over every optimizer: param_remainders (bf16 params + int16 remainders holding an
exact fp32 master) and state_dtype=torch.bfloat16, on both paths, in the same single launch."""
import pytest
import torch

import fused_optim
from cases import ALL, config_id, make_params, param_groups, run
from conftest import DEVICE
from helpers import assert_states_close, launches, saved, step_twins, twin_grads
from fused_optim.kernels.lean import join_remainder, split_remainder

BF16 = torch.bfloat16
# every optimizer that takes the options (LBFGS refuses them), in its first configuration
LEAN = [c for c in ALL if c.cls.supports_precision_options]
LEAN_IDS = [c.name for c in LEAN]
PATHS = pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])


def _make(case, fused, dtype=BF16, **opts):
    a1, a2 = make_params(case, dtype, DEVICE)
    return case.cls(param_groups(case, case.configs[0], a1, a2), fused=fused, **case.configs[0], **opts), a1 + a2


def _tie(master):
    """Where the master's low 16 bits are exactly half a bf16 ulp (the one case the two roundings differ)."""
    return (master.view(torch.int32) & 0xFFFF) == 0x8000


def _assert_same_as_master_weights(mw, pa, rem, pb):
    for p, q in zip(pa, pb):
        m = mw.state[p]["master_param"]
        joined = join_remainder(q.detach(), rem.state[q]["param_remainder"])
        assert torch.equal(m.view(torch.int32), joined.view(torch.int32)), "the fp32 masters differ"
        tie = _tie(m)
        # the params: equal but at exact ties, where the remainder's param is the neighbour above in magnitude
        assert torch.equal(p.detach()[~tie], q.detach()[~tie])
        assert torch.equal(q.detach(), split_remainder(m)[0])


def test_remainder_split_join_is_exact_and_rounds_to_nearest():
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31 - 1, (50000,), dtype=torch.int32, generator=gen)
    bits[:4] = torch.tensor([0x3F808000, 0x3F818000, -0x40800000 + 0x8000, 0x7F800000], dtype=torch.int32)
    m = bits.view(torch.float32)
    p, r = split_remainder(m)
    assert p.dtype == BF16 and r.dtype == torch.int16
    assert torch.equal(join_remainder(p, r).view(torch.int32), bits)  # every bit pattern, NaNs included
    finite = torch.isfinite(m) & ~_tie(m)
    assert torch.equal(p[finite], m[finite].to(BF16))  # round to nearest (even) away from ties
    assert _tie(m)[:3].all() and torch.equal(p[:3].float().abs(), torch.tensor([1.0078125, 1.015625, 1.0078125]))


@PATHS
@pytest.mark.parametrize("make", [lambda ps, **kw: fused_optim.AdamW(ps, lr=1e-2, **kw),
                                  lambda ps, **kw: fused_optim.SGD(ps, lr=1e-2, momentum=0.9, **kw)],
                         ids=["AdamW", "SGD"])
def test_remainders_equal_master_weights_over_100_steps(make, fused):
    gen = torch.Generator().manual_seed(0)
    pa = [torch.nn.Parameter(torch.randn(n, generator=gen).to(BF16).to(DEVICE)) for n in (5, 300, 1)]
    pb = [torch.nn.Parameter(p.detach().clone()) for p in pa]
    mw, rem = make(pa, fused=fused, master_weights=True), make(pb, fused=fused, param_remainders=True)
    step_twins(mw, pa, rem, pb, gen, steps=100)
    _assert_same_as_master_weights(mw, pa, rem, pb)


@PATHS
@pytest.mark.parametrize("case", LEAN, ids=LEAN_IDS)
def test_remainders_equal_master_weights_every_optimizer(case, fused):
    if fused and not case.kernel:
        pytest.skip("no fused path")
    mw, pa = _make(case, fused, master_weights=True)
    rem, pb = _make(case, fused, param_remainders=True)
    run(case, [mw, rem], [pa, pb], steps=3)
    _assert_same_as_master_weights(mw, pa, rem, pb)
    for q in pb:
        assert rem.state[q]["param_remainder"].dtype == torch.int16 and "master_param" not in rem.state[q]


def test_remainders_fused_matches_reference_and_one_launch():
    gen = torch.Generator().manual_seed(0)
    pa = [torch.nn.Parameter(torch.randn(n, generator=gen).to(BF16).to(DEVICE)) for n in (5, 700)]
    pb = [torch.nn.Parameter(p.detach().clone()) for p in pa]
    fa = fused_optim.Adam(pa, lr=1e-2, fused=True, param_remainders=True, stochastic_rounding=True)
    fb = fused_optim.Adam(pb, lr=1e-2, fused=False, param_remainders=True, stochastic_rounding=True)
    for _ in range(5):
        twin_grads(pa, pb, gen)
        assert launches(fa.step)[0] == 1
        fb.step()
    for p, q in zip(pa, pb):  # stochastic_rounding leaves the params to the remainders: deterministic
        ja = join_remainder(p.detach(), fa.state[p]["param_remainder"])
        jb = join_remainder(q.detach(), fb.state[q]["param_remainder"])
        torch.testing.assert_close(ja, jb, rtol=1e-6, atol=1e-7)


def test_remainders_checkpoint_round_trip():
    gen = torch.Generator().manual_seed(0)
    make = lambda ps: fused_optim.AdamW(ps, lr=1e-2, param_remainders=True)
    pa = [torch.nn.Parameter(torch.randn(40, generator=gen).to(BF16))]
    opt = make(pa)
    grads = [torch.randn(40, generator=gen).to(BF16) for _ in range(4)]
    for g in grads[:2]:
        pa[0].grad = g
        opt.step()
    pb = [torch.nn.Parameter(pa[0].detach().clone())]
    again = make(pb)
    again.load_state_dict(saved(opt.state_dict()))
    assert again.state[pb[0]]["param_remainder"].dtype == torch.int16
    for g in grads[2:]:
        pa[0].grad, pb[0].grad = g, g.clone()
        opt.step()
        again.step()
    assert torch.equal(pa[0], pb[0])
    assert torch.equal(opt.state[pa[0]]["param_remainder"], again.state[pb[0]]["param_remainder"])


def test_lean_options_bad_input():
    f32 = [torch.nn.Parameter(torch.randn(3))]
    bf = [torch.nn.Parameter(torch.randn(3).to(BF16))]
    with pytest.raises(ValueError, match="param_remainders.*float32"):
        fused_optim.AdamW(f32, param_remainders=True)
    with pytest.raises(ValueError, match="float16"):
        fused_optim.SGD(bf + [torch.nn.Parameter(torch.randn(3).half())], param_remainders=True)
    opt = fused_optim.AdamW(bf, param_remainders=True)
    with pytest.raises(ValueError, match="param_remainders"):
        opt.add_param_group({"params": f32})
    with pytest.raises(ValueError, match="pick one"):
        fused_optim.AdamW(bf, param_remainders=True, master_weights=True)
    for bad in (torch.float16, "fp8", torch.int8, 16):
        with pytest.raises(ValueError, match="state_dtype"):
            fused_optim.Adam(f32, state_dtype=bad)
    with pytest.raises(ValueError, match="param_remainders"):
        fused_optim.LBFGS(bf, param_remainders=True)
    with pytest.raises(ValueError, match="state_dtype"):
        fused_optim.LBFGS(f32, state_dtype=BF16)


# ---- state_dtype=torch.bfloat16 ------------------------------------------------------------------------------------
def _elementwise_states(opt, p):
    return {k: v for k, v in opt.state[p].items() if opt._is_elementwise_state(k, v, p)}


@pytest.mark.parametrize("case", [c for c in LEAN if c.kernel], ids=[c.name for c in LEAN if c.kernel])
def test_bf16_states_fused_matches_reference(case):
    """fp32 params, bf16 states: both paths do fp32 math on the same loaded bf16 values and round to nearest once,
    so after 3 steps they agree to about one bf16 rounding of a state (2^-8 relative) and its effect on the
    params."""
    fused, pa = _make(case, True, torch.float32, state_dtype=BF16)
    ref, pb = _make(case, False, torch.float32, state_dtype=BF16)
    run(case, [fused, ref], [pa, pb], steps=3)
    for p, q in zip(pa, pb):
        sa, sb = _elementwise_states(fused, p), _elementwise_states(ref, q)
        assert sa.keys() == sb.keys() and p.dtype == torch.float32
        assert all(v.dtype == BF16 for v in (*sa.values(), *sb.values()))
    assert_states_close(fused, pa, ref, pb, rtol=2 ** -7, atol=1e-3)


@PATHS
def test_bf16_states_stochastic_rounding_is_unbiased(fused):
    """RMSprop (alpha 0.99) on a constant grad 1: square_avg = 1 - 0.99^t. Each step adds (1 - s) / 100, below half
    a bf16 ulp once s > 0.8, so round-to-nearest stalls there; stochastic rounding keeps the mean on track.
    Measured (reference path, 512 elements, 150 steps, exact 0.7785): RN 0.8047 (every element), SR mean 0.7783."""
    def run_(sr):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.zeros(512, device=DEVICE))
        opt = fused_optim.RMSprop([p], lr=0.0, alpha=0.99, fused=fused, state_dtype=BF16, stochastic_rounding=sr)
        p.grad = torch.ones_like(p)
        for _ in range(150):
            opt.step()
        return opt.state[p]["square_avg"]
    exact = 1 - 0.99 ** 150
    rn, sr = run_(False), run_(True)
    assert rn.dtype == sr.dtype == BF16
    assert abs(rn.float().mean().item() - exact) > 0.02
    assert abs(sr.float().mean().item() - exact) < 0.002
    assert sr.unique().numel() > 1  # rounded each way


@PATHS
def test_bf16_states_one_launch_and_checkpoint(fused):
    gen = torch.Generator().manual_seed(0)
    make = lambda ps, **kw: fused_optim.AdamW(ps, lr=1e-2, fused=fused, state_dtype=BF16, **kw)
    pa = [torch.nn.Parameter(torch.randn(n, generator=gen).to(DEVICE)) for n in (5, 600)]
    opt = make(pa)
    grads = [[torch.randn(p.shape, generator=gen).to(DEVICE) for p in pa] for _ in range(4)]
    for gs in grads[:2]:
        for p, g in zip(pa, gs):
            p.grad = g
        assert launches(opt.step)[0] == (1 if fused else 0)
    pb = [torch.nn.Parameter(p.detach().clone()) for p in pa]
    again = make(pb)
    again.load_state_dict(saved(opt.state_dict()))
    for gs in grads[2:]:
        for p, q, g in zip(pa, pb, gs):
            p.grad, q.grad = g, g.clone()
        opt.step()
        again.step()
    for p, q in zip(pa, pb):
        assert torch.equal(p, q)
        assert all(torch.equal(opt.state[p][k], again.state[q][k]) for k in ("exp_avg", "exp_avg_sq"))
        assert again.state[q]["exp_avg"].dtype == BF16
    # an fp32 (torch) checkpoint loads into bf16 states, rounded to nearest
    anchor = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone().cpu()) for p in pa], lr=1e-2)
    anchor.load_state_dict(opt.state_dict())
    for p, g in zip(anchor.param_groups[0]["params"], grads[0]):
        p.grad = g.cpu()
    anchor.step()  # fp32 states that bf16 does not hold exactly
    lean = make([torch.nn.Parameter(p.detach().clone()) for p in pa])
    lean.load_state_dict(anchor.state_dict())
    for st_lean, st_anchor in zip(lean.state.values(), anchor.state.values()):
        assert torch.equal(st_lean["exp_avg"].cpu(), st_anchor["exp_avg"].to(BF16))


def test_anchor_state_dict_moves_to_torch_and_back():
    gen = torch.Generator().manual_seed(0)
    pa = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (5, 60)]
    lean = fused_optim.AdamW(pa, lr=1e-2, state_dtype=BF16)
    for p in pa:
        p.grad = torch.randn(p.shape, generator=gen)
    lean.step()
    sd = lean.anchor_state_dict()
    assert sd["state"][1]["exp_avg"].dtype == torch.float32 and lean.state[pa[1]]["exp_avg"].dtype == BF16
    anchor = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in pa], lr=1e-2)
    anchor.load_state_dict(saved(sd))
    back = fused_optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in pa], lr=1e-2, state_dtype=BF16)
    back.load_state_dict(saved(anchor.state_dict()))
    for p, q, r in zip(pa, anchor.param_groups[0]["params"], back.param_groups[0]["params"]):
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(anchor.state[q][k], lean.state[p][k].float())
            assert torch.equal(back.state[r][k], lean.state[p][k])
    rem = fused_optim.SGD([torch.nn.Parameter(torch.randn(8).to(BF16))], lr=0.1, momentum=0.9, param_remainders=True)
    rem.param_groups[0]["params"][0].grad = torch.randn(8).to(BF16)
    rem.step()
    assert "param_remainder" not in rem.anchor_state_dict()["state"][0]
    assert "param_remainder" in rem.state_dict()["state"][0]
