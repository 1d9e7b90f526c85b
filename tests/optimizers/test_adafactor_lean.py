"""The precision and lean options inside Adafactor's fused kernels (master_weights, stochastic_rounding,
param_remainders, state_dtype=bf16 and "int8"): fused against reference over 20 steps, the same launches as without
the options, checkpoints round-trip.

Shapes: factored 2-D (several row and column tiles), factored 3-D both ways (dims 0, 1 of a conv-like weight: the
planes interleave in storage; the last two dims: planes one after another), non-factored 1-D of an odd size, 0-d,
empty. Configurations: the relative step with scale_parameter (the step size reads RMS(p): of the master), and an
external lr with betas (exp_avg) and weight decay, with and without caution.

Tolerances as tests/optimizers/test_layerwise_lean.py: the exact fp32 masters agree to float32 rounding (rtol 1e-5),
bf16 states within one bf16 ulp (rtol 2^-8), stochastically rounded states by the distance between the masters
relative to the distance travelled (5%); int8 states as tests/generic/test_int8.py: codes off by at most 1 on at most
0.2% of the elements, scales and params within 1e-5 (atol 1e-4: the effect of such a code). A bf16 state rounded the
other way (one ulp, 2^-8 of exp_avg, itself of the order of lr) moves the master by up to 2^-8 * lr / (1 - beta1):
with bf16 states, at most 1% of the master's elements may differ by more than float32 rounding, and by no more than
that.
"""
import pytest
import torch

import fused_optim
from conftest import DEVICE
from helpers import assert_close, fp32_master, launches, loaded_twin, twin_grads
from fused_optim.kernels.lean import split_remainder

BF16 = torch.bfloat16
SHAPES = [(40, 35), (20, 18, 3), (2, 17, 19), (33,), (), (0,)]
LR = 0.01  # the step size of every configuration (the relative one: at most 1e-2 * RMS(p) < 0.01)
CONFIGS = {"relative": {},
           "betas,wd": {"lr": LR, "betas": (0.9, 0.999), "weight_decay": 0.1},
           "relative,betas,caution": {"betas": (0.8, 0.99), "weight_decay": 0.01, "caution": True}}
OPTIONS = {"master+SR": dict(master_weights=True, stochastic_rounding=True),
           "remainders+bf16-states": dict(param_remainders=True, state_dtype=BF16),
           "master+bf16-states+SR": dict(master_weights=True, state_dtype=BF16, stochastic_rounding=True)}
# each option and each configuration at least once (20 interpreted steps each)
RUNS = [("master+SR", "relative"), ("remainders+bf16-states", "betas,wd"),
        ("remainders+bf16-states", "relative,betas,caution"), ("master+bf16-states+SR", "relative,betas,caution")]
INT8_RUNS = [(torch.float32, "betas,wd"), (BF16, "relative,betas,caution")]
ELEMENTWISE = ("exp_avg", "exp_avg_sq")  # lean; the factored row / column moments stay fp32


def _make(fused, config, dtype=BF16, **opts):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter((torch.rand(s, generator=gen) * 2 - 1).add_(0.1).to(dtype).to(DEVICE)) for s in SHAPES]
    return fused_optim.Adafactor(ps, fused=fused, **CONFIGS[config], **opts), ps


def _run(opts, params, steps, seed=1):
    """steps of the optimizers, all on the same random grads."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        twin_grads(params[0], params[-1], gen)
        for opt, ps in zip(opts, params):
            for p, q in zip(ps, params[-1]):
                p.grad = q.grad.clone()
            opt.step()



def _launches_per_step(config, dtype, **opts):
    """(Triton, C++ engine) launches of a fused step without the lean options (the same every step)."""
    plain, pp = _make(True, config, dtype, **opts)
    n = launches(lambda: _run((plain,), (pp,), 2))
    return n[0] // 2, n[1] // 2


def _assert_masters_close(ma, mb, lean_states, what):
    err = (ma - mb).abs()
    close = err <= 1e-5 * mb.abs() + 1e-6
    assert close.all() or (lean_states and close.float().mean() >= 0.99), f"{what}: {int((~close).sum())} differ"
    assert (err <= 2 ** -8 * LR / (1 - 0.9) + 1e-6).all(), f"{what}: {float(err.max())}"


@pytest.mark.parametrize("label,config", RUNS)
def test_fused_matches_reference_with_lean_options(label, config):
    opts = OPTIONS[label]
    per_step = _launches_per_step(config, BF16)
    fused, pa = _make(True, config, **opts)
    ref, pb = _make(False, config, **opts)
    start = [p.detach().float() for p in pa]
    n = launches(lambda: _run((fused, ref), (pa, pb), 20))
    assert n[0] > 0 and n == (20 * per_step[0], 20 * per_step[1]), (n, per_step)
    for i, (p, q) in enumerate(zip(pa, pb)):
        ma, mb = fp32_master(fused, p), fp32_master(ref, q)
        assert ma.dtype == torch.float32
        sa, sb = fused.state[p], ref.state[q]
        assert sa.keys() == sb.keys()
        for k in ELEMENTWISE:
            if k in sb:
                assert sa[k].dtype == sb[k].dtype == (BF16 if "states" in label else torch.float32)
        for k in ("exp_avg_sq_row", "exp_avg_sq_col"):
            if k in sb:
                assert sa[k].dtype == torch.float32
        if "states+SR" in label:  # other random bits: the masters agree to a small fraction of the distance moved
            moved = float((mb - start[i]).norm())
            assert float((ma - mb).norm()) <= 0.05 * moved + 1e-6, f"param {i}"
            assert moved > 0 or p.numel() == 0
            continue
        _assert_masters_close(ma, mb, "states" in label, f"master {i}")
        if p.numel():  # (an empty param's RMS is 0 / 0 on both paths)
            assert_close(sa["RMS"], sb["RMS"], 1e-5, 1e-7, f"RMS {i}")
        for k, v in sb.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point() and k not in ("step", "RMS", "master_param"):
                assert_close(sa[k].float(), v.float(), 2 ** -8 if v.dtype == BF16 else 1e-5, 1e-6, f"{i} {k}")
        if "SR" in label:  # the bf16 param: one of its master's two bf16 neighbours
            assert ((p.detach().float() - ma).abs() <= ma.abs() * 2 ** -7).all()
        else:  # the master rounded (ties up in magnitude: kernels/lean.py)
            assert torch.equal(p.detach(), split_remainder(ma)[0]) and torch.equal(q.detach(), split_remainder(mb)[0])


@pytest.mark.parametrize("dtype,config", INT8_RUNS, ids=[f"{str(d)[6:]}-{c}" for d, c in INT8_RUNS])
def test_int8_fused_matches_reference(dtype, config):
    """int8_min_numel=0: every element-wise state quantized (partial blocks, a 0-d state, an empty one), so the
    group is one dtype bucket: the launches of fp32 states."""
    opts = dict(state_dtype="int8", int8_min_numel=0, param_remainders=dtype == BF16)
    per_step = _launches_per_step(config, dtype, param_remainders=dtype == BF16)
    fused, pa = _make(True, config, dtype, **opts)
    ref, pb = _make(False, config, dtype, **opts)
    n = launches(lambda: _run((fused, ref), (pa, pb), 20))
    assert n[0] > 0 and n == (20 * per_step[0], 20 * per_step[1]), (n, per_step)
    for i, (p, q) in enumerate(zip(pa, pb)):
        sa, sb = fused.state[p], ref.state[q]
        assert sa.keys() == sb.keys()
        for k, v in sb.items():
            if k in ELEMENTWISE:
                assert v.dtype == sa[k].dtype == torch.uint8 and k + "_absmax" in sa
                off = (sa[k].int() - v.int()).abs()
                assert off.numel() == 0 or (off.max() <= 1 and off.float().mean() <= 2e-3), f"{i} {k}: {off.sum()}"
            elif isinstance(v, torch.Tensor) and v.is_floating_point() and k != "step" and p.numel():
                assert sa[k].dtype == torch.float32
                assert_close(sa[k], v, 1e-5, 1e-7, f"{i} {k}")
        assert_close(fp32_master(fused, p).float(), fp32_master(ref, q).float(), 1e-5, 1e-4, f"master {i}")


@pytest.mark.parametrize("opts", [dict(param_remainders=True, state_dtype=BF16),
                                  dict(param_remainders=True, state_dtype="int8", int8_min_numel=0)],
                         ids=["remainders+bf16-states", "remainders+int8"])
def test_lean_checkpoint_round_trip_on_the_fused_path(opts):
    config = "relative,betas,caution"
    opt, pa = _make(True, config, **opts)
    _run((opt,), (pa,), 3)
    again, pb = _make(True, config, **opts)
    loaded_twin(opt, pa, again, pb)
    _run((opt, again), (pa, pb), 3, seed=5)
    for p, q in zip(pa, pb):
        assert torch.equal(p.detach(), q.detach())
        sa, sb = opt.state[p], again.state[q]
        assert sa.keys() == sb.keys()
        for k, v in sa.items():
            if isinstance(v, torch.Tensor):  # (an empty param's RMS: NaN on both)
                assert v.dtype == sb[k].dtype, k
                torch.testing.assert_close(v, sb[k], rtol=0, atol=0, equal_nan=True, msg=k)


def test_int8_states_of_a_non_contiguous_param_take_the_reference_path():
    """int8 blocks follow the param's storage order, which the kernels' contiguous copy would not: reference path
    (no launch), the same numbers as fused=False."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(35, 40, generator=gen).to(DEVICE)
    pa, pb = torch.nn.Parameter(base.clone().t()), torch.nn.Parameter(base.clone().t())  # (40, 35), transposed
    kw = dict(lr=LR, betas=(0.9, 0.999), state_dtype="int8", int8_min_numel=0)
    fused, ref = fused_optim.Adafactor([pa], fused=True, **kw), fused_optim.Adafactor([pb], fused=False, **kw)
    n = launches(lambda: _run((fused, ref), ([pa], [pb]), 3))
    assert n == (0, 0) and torch.equal(pa, pb)
    assert torch.equal(fused.state[pa]["exp_avg"], ref.state[pb]["exp_avg"])
