"""master_weights, stochastic_rounding, param_remainders and state_dtype=bf16 inside the fused kernels of the
optimizers with per-tensor statistics (NovoGrad, NvNovoGrad, Lars, Adahessian, Lamb) and per-row ones (SGDP, AdamP:
their statistics pass reads the masters): fused against reference over 20 steps on bf16 params, same launches as without
the options, checkpoints round-trip.

Tolerances: every run here keeps an exact fp32 master (master_weights or param_remainders), and both paths do fp32
math on the same loaded values, so the masters agree to float32 rounding (rtol 1e-5; Lars' and NovoGrad's norms
are summed in another order). bf16 states are rounded once per step from fp32 values that agree to float32
rounding: equal, or one bf16 ulp apart where a value straddles a rounding boundary (rtol 2^-7: one ulp is 2^-8 to
2^-7 of the value). Stochastically rounded states draw other random bits on the two paths: no element-wise
agreement is defined, so those runs are compared by the distance between the two masters relative to the distance travelled (at most 5%); so are
Adahessian's runs with SR or bf16 states (see the test) and AdamP's with bf16 states (Adam's normalised step turns a
first moment one bf16 ulp apart into a step lr * 2^-8 apart, every step while it lasts: measured 0.05% of the
distance travelled after 20 steps).
"""
import pytest
import torch

from cases import ALL, run
from cases.projection import MODES
from conftest import DEVICE
from helpers import assert_close, launches, loaded_twin
from fused_optim.kernels.lean import join_remainder

BF16 = torch.bfloat16
CASE = {c.name: c for c in ALL}
# per family: a configuration whose kernel reads the statistics (Lars: weight decay, so the trust ratio adapts)
CONFIG = {"NvNovoGrad": {"lr": 0.01, "weight_decay": 0.1, "grad_averaging": True},
          "NovoGrad": {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True},
          "Lars": {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01},
          "Adahessian": {"lr": 0.05, "weight_decay": 0.01},
          # with Nesterov and caution here, without in tests/generic/test_int8.py
          "SGDP": {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1, "caution": True},
          "AdamP": {"lr": 0.01, "weight_decay": 0.1},
          # weight decay (the trust ratio adapts) and caution; no global clip: on bf16 grads timm's clip (the
          # reference) rounds the grads' norm to bf16, the fused one keeps it fp32 (tests/generic/test_int8.py clips)
          "Lamb": {"lr": 0.01, "weight_decay": 0.1, "caution": True, "max_grad_norm": None}}
# their driver makes the grads from the first list's params: fused and reference step together
PROJECTED = ("SGDP", "AdamP")
SHAPES = [(5, 3), (7,), (), (0,), (33, 20)]  # odd sizes, 0-d, empty, several chunks (conftest: 512-element chunks)
# each option once: the master copy with stochastically rounded params, remainders with bf16 states rounded to
# nearest (bf16 states with stochastic rounding: the shared kernel's store, tested in test_lean.py)
OPTIONS = {"master+SR": dict(master_weights=True, stochastic_rounding=True),
           "remainders+bf16-states": dict(param_remainders=True, state_dtype=BF16)}
FAMILIES = pytest.mark.parametrize("name", list(CONFIG))
# and bf16 states rounded stochastically in SGDP's own kernel (its random bits: per tensor and state)
OPTIONS["remainders+bf16-states+SR"] = dict(param_remainders=True, state_dtype=BF16, stochastic_rounding=True)
# NovoGrad and NvNovoGrad share one code path for the options (per-tensor norms, then the shared kernel): one
# option each
SHARED = {("remainders+bf16-states", "NovoGrad"), ("master+SR", "NvNovoGrad")}
RUNS = [(label, name) for label in list(OPTIONS)[:2] for name in CONFIG if (label, name) not in SHARED] + [
    ("remainders+bf16-states+SR", "SGDP")]


def _make(name, fused, **opts):
    gen = torch.Generator().manual_seed(0)
    ps = [(torch.rand(s, generator=gen) * 2 - 1).add_(0.1).to(BF16).to(DEVICE).requires_grad_(name == "Adahessian")
          for s in SHAPES]
    return CASE[name].cls(ps, fused=fused, **CONFIG[name], **opts), ps


def _master(opt, p):
    st = opt.state[p]
    return st["master_param"] if "master_param" in st else join_remainder(p.detach(), st["param_remainder"])


def _states(opt, p):
    return {k: v for k, v in opt.state[p].items() if isinstance(v, torch.Tensor) and v.is_floating_point()
            and k not in ("master_param", "step")}  # NvNovoGrad's step: a float32 tensor fused, timm's int else


@pytest.mark.parametrize("label,name", RUNS)
def test_fused_matches_reference_with_lean_options(name, label):
    opts = OPTIONS[label]
    plain, pp = _make(name, True)
    fused, pa = _make(name, True, **opts)
    ref, pb = _make(name, False, **opts)
    start = [p.detach().float() for p in pa]  # the masters start as the bf16 params
    if name in PROJECTED:  # (the reference path launches nothing; the launches of a step do not depend on its data)
        n_plain = tuple(20 * k for k in launches(lambda: run(CASE[name], [plain], [pp], steps=1)))
        MODES.clear()
        n = launches(lambda: run(CASE[name], [fused, ref], [pa, pb], steps=20))
        assert {(2, 1), (2, 2)} <= set(MODES), MODES  # projected per channel and per layer
        if "states+SR" in label:  # the same run rounding the states to nearest ends elsewhere: the kernel's SR is on
            rn, pc = _make(name, True, **{**opts, "stochastic_rounding": False})
            run(CASE[name], [rn], [pc], steps=20)
            assert not all(torch.equal(v, _states(rn, q)[k]) for p, q in zip(pa, pc)
                           for k, v in _states(fused, p).items())
    else:
        n_plain = launches(lambda: run(CASE[name], [plain], [pp], steps=20))
        n = launches(lambda: run(CASE[name], [fused], [pa], steps=20))
        run(CASE[name], [ref], [pb], steps=20)
    # the same launches as without the options (Lars' weight norms over remainders, SGDP / AdamP's row statistics
    # over either master: Triton instead of the engine)
    if (name == "Lars" and "remainders" in label) or name in PROJECTED:
        assert n == (n_plain[0], 0), (n, n_plain)
    else:
        assert n == n_plain, (n, n_plain)
    # Adahessian's grads and Hessian come from the bf16 params through autograd: a param one ulp apart (other SR
    # bits, a bf16 state rounded the other way) changes the next grads, a feedback the random grads of the other
    # families do not have; those runs are compared by distance too
    sr_states = "states+SR" in label or (name == "Adahessian" and ("SR" in label or "states" in label)) or (
        name == "AdamP" and "states" in label)
    for i, (p, q) in enumerate(zip(pa, pb)):
        ma, mb = _master(fused, p), _master(ref, q)
        assert ma.dtype == torch.float32
        if sr_states:  # other random bits: the masters agree to a small fraction of the distance travelled
            moved = float((mb - start[i]).norm())
            assert float((ma - mb).norm()) <= 0.05 * moved + 1e-6, f"param {i}"
            continue
        assert_close(ma, mb, 1e-5, 1e-6, f"master {i}")
        sa, sb = _states(fused, p), _states(ref, q)
        assert sa.keys() == sb.keys()
        for k in sb:
            assert_close(sa[k], sb[k], 2 ** -7, 1e-6, f"param {i} state {k}")
        if "SR" in label:  # the bf16 param: one of the master's two bf16 neighbours
            assert ((p.detach().float() - ma).abs() <= ma.abs() * 2 ** -7).all()
        elif "master" in label:
            assert torch.equal(p.detach(), ma.to(BF16)) and torch.equal(q.detach(), mb.to(BF16))
    for p in pa:
        if "state_dtype" in opts:
            assert all(v.dtype == BF16 for k, v in _states(fused, p).items() if v.shape == p.shape and p.dim())


@FAMILIES
def test_lean_checkpoint_round_trip_on_the_fused_path(name):
    opts = dict(param_remainders=True, state_dtype=BF16)
    opt, pa = _make(name, True, **opts)
    run(CASE[name], [opt], [pa], steps=3)
    again, pb = _make(name, True, **opts)
    loaded_twin(opt, pa, again, pb)
    run(CASE[name], [opt, again], [pa, pb], steps=3, seed=5)
    for p, q in zip(pa, pb):
        assert torch.equal(p.detach(), q.detach())
        assert torch.equal(opt.state[p]["param_remainder"], again.state[q]["param_remainder"])
        for k, v in _states(opt, p).items():
            assert torch.equal(v, _states(again, q)[k]) and v.dtype == _states(again, q)[k].dtype
