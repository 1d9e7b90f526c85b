"""Muon's own tests: torch's refusals, the batched Newton-Schulz against torch's per-matrix one, and the fused step's
launches, element math and steady state (the Case in cases/muon.py runs the generic ones)."""
import inspect

import pytest
import torch
from torch.optim._muon import _zeropower_via_newtonschulz as torch_newton_schulz

import fused_optim
from conftest import DEVICE
from helpers import assert_unchanged, launches, saved, snapshot, step_twins, twin_grads
from fused_optim.kernels import quant
from fused_optim.optimizers.muon import NS_COEFFICIENTS, adjusted_ratio, newton_schulz


def _torch_ns(x, coefficients, steps, eps):
    extra = {"use_addmm": True} if "use_addmm" in inspect.signature(torch_newton_schulz).parameters else {}
    return torch_newton_schulz(x, coefficients, steps, eps, **extra)


@pytest.mark.parametrize("kw", [{"lr": -1.0}, {"momentum": -0.5}, {"weight_decay": -0.1},
                                {"adjust_lr_fn": "sqrt"}], ids=str)
def test_constructor_refusals_are_torchs(kw):
    with pytest.raises(ValueError) as theirs:
        torch.optim.Muon([torch.nn.Parameter(torch.randn(3, 2))], **kw)
    with pytest.raises(ValueError) as ours:
        fused_optim.Muon([torch.nn.Parameter(torch.randn(3, 2))], **kw)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("shape", [(3,), (2, 3, 4), ()], ids=str)
def test_non_matrix_params_refused_as_torch(shape):
    with pytest.raises(ValueError) as theirs:
        torch.optim.Muon([torch.nn.Parameter(torch.randn(shape))])
    with pytest.raises(ValueError) as ours:
        fused_optim.Muon([torch.nn.Parameter(torch.randn(shape))])
    assert str(ours.value) == str(theirs.value)
    opt = fused_optim.Muon([torch.nn.Parameter(torch.randn(3, 2))])
    with pytest.raises(ValueError, match="only supports 2D"):  # an added group too (torch only checks the first)
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(shape))]})


@pytest.mark.parametrize("key,value", [("ns_steps", 100), ("ns_coefficients", (1.0, 2.0))])
def test_newton_schulz_refusals_before_any_change(key, value):
    p = torch.nn.Parameter(torch.randn(4, 3))
    theirs = torch.optim.Muon([p], **{key: value})
    p.grad = torch.randn(4, 3)
    with pytest.raises(ValueError) as t_err:
        theirs.step()  # torch raises after updating the momentum buffer
    with pytest.raises(ValueError) as o_err:
        fused_optim.Muon([torch.nn.Parameter(torch.randn(4, 3))], **{key: value})
    assert str(o_err.value) == str(t_err.value)
    # a group edited after construction: refused by step() with nothing changed
    q = torch.nn.Parameter(torch.randn(4, 3))
    ours = fused_optim.Muon([q])
    q.grad = torch.randn(4, 3)
    ours.step()
    ours.param_groups[0][key] = value
    snap = snapshot(ours, [q])
    with pytest.raises(ValueError, match=str(t_err.value)):
        ours.step()
    assert_unchanged(ours, [q], snap)


def test_complex_refused_as_torch():
    z = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))
    theirs = torch.optim.Muon([z])
    z.grad = torch.randn_like(z)
    with pytest.raises(RuntimeError) as t_err:
        theirs.step()
    with pytest.raises(RuntimeError) as o_err:  # ours already at construction
        fused_optim.Muon([torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))])
    assert str(o_err.value) == str(t_err.value)


@pytest.mark.parametrize("shape", [(16, 16), (33, 17), (17, 33), (5, 3), (1, 9)], ids=str)
@pytest.mark.parametrize("steps", [5, 2, 0])
def test_batched_newton_schulz_matches_torchs_per_matrix(shape, steps):
    """One bmm/baddbmm chain over a stack equals torch's chain on each matrix alone to bf16 rounding: batched and
    single matmul kernels may sum in another order (on CPU they mostly agree bit for bit), and the results are bf16,
    whose ulp is 2^-8 at the largest entries (|O| < 1): the bound is 2 ulps."""
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(4, *shape, generator=gen).to(DEVICE)
    expected = torch.stack([_torch_ns(x, NS_COEFFICIENTS, steps, 1e-7) for x in xs])
    out = torch.empty_like(expected)
    got = newton_schulz(xs.bfloat16(), NS_COEFFICIENTS, steps, 1e-7, out=out)
    assert got is out and got.dtype == torch.bfloat16
    assert expected.float().abs().max() > 0.1
    torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=2 ** -7)


def _pair(nesterov=True, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 4), (4, 6), (6, 4), (33, 17), (1, 5)]
    pa = [torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE, dtype)) for s in shapes]
    pb = [torch.nn.Parameter(p.detach().clone()) for p in pa]
    kw = dict(lr=0.02, weight_decay=0.05, nesterov=nesterov, adjust_lr_fn="match_rms_adamw")
    return fused_optim.Muon(pa, fused=True, **kw), pa, fused_optim.Muon(pb, fused=False, **kw), pb


@pytest.mark.parametrize("nesterov", [True, False])
def test_fused_step_launches_and_element_math(nesterov):
    """Per group and step: 2 launches (momentum, update), the same every step (tables and Newton-Schulz stacks built
    once); the momentum buffers equal the reference's to float32 rounding, and each param moves by exactly
    -lr * ratio * O after the decay, O being the batched Newton-Schulz result the update launch read."""
    fused, pa, ref, pb = _pair(nesterov)
    gen = torch.Generator().manual_seed(1)
    builds = None
    for step in range(4):
        twin_grads(pa, pb, gen)
        before = [p.detach().clone() for p in pa]
        assert launches(fused.step, ref.step)[0] == 2
        ws = fused._kernel_caches[(id(fused.param_groups[0]), "workspace")]
        assert len(ws.stacks) == 4  # one Newton-Schulz chain per distinct shape, not per param
        for p, q, p0, o in zip(pa, pb, before, ws.results):
            torch.testing.assert_close(fused.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"],
                                       rtol=1e-6, atol=1e-7)
            lr = 0.02 * adjusted_ratio("match_rms_adamw", p.shape)
            torch.testing.assert_close(p.detach(), p0 * (1 - 0.02 * 0.05) - lr * o.float(), rtol=1e-6, atol=1e-7)
        caches = [c for k, c in fused._kernel_caches.items() if k[1] in ("momentum", "update")]
        now = sum(c.builds for c in caches)
        assert builds is None or now == builds
        builds = now


def test_bf16_momentum_buffer_is_not_normalized():
    """nesterov=False hands the momentum buffer itself to the orthogonalization; a bf16 buffer must stay the
    momentum (torch 2.13 divides it by its norm in place, fixed after pytorch/pytorch#194664)."""
    p = torch.nn.Parameter(torch.randn(6, 4, dtype=torch.bfloat16))
    opt = fused_optim.Muon([p], nesterov=False, fused=False)
    p.grad = torch.randn(6, 4, dtype=torch.bfloat16)
    opt.step()
    expected = torch.zeros_like(p).lerp_(p.grad, 1 - 0.95)
    assert torch.equal(opt.state[p]["momentum_buffer"], expected)


def test_factory_name():
    opt = fused_optim.create_optimizer([torch.nn.Parameter(torch.randn(3, 2))], "muon", lr=0.02)
    assert type(opt) is fused_optim.Muon and opt.defaults["weight_decay"] == 0.0  # the factory's default


# ---- state_dtype="int8": the momentum buffer as codes + per-block scales (signed map) on both paths ---------------
INT8_SHAPES = [(17, 31), (31, 17), (8, 40), (3, 5)]  # quantized x3 (odd sizes: partial blocks; wide, tall), fp32 x1


def _int8_twins(fused_a, fused_b, seed=0):
    gen = torch.Generator().manual_seed(seed)
    made = []
    for fused in (fused_a, fused_b):
        gen.manual_seed(seed)
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen).to(DEVICE)) for s in INT8_SHAPES]
        made += [fused_optim.Muon(ps, lr=0.02, fused=fused, state_dtype="int8", int8_min_numel=256), ps]
    return made


def test_int8_fused_matches_reference():
    """20 steps on both paths: the same codes and scales (measured: bit-identical; asserted as the other families':
    codes off by at most 1 on at most 0.2%, scales within 1e-5) and params within 2e-4 (the batched chain's bf16 ulp,
    as without int8)."""
    fused, pa, ref, pb = _int8_twins(True, False)
    step_twins(fused, pa, ref, pb, torch.Generator().manual_seed(1), steps=20)
    for p, q in zip(pa, pb):
        sa, sb = fused.state[p], ref.state[q]
        assert sa.keys() == sb.keys()
        if p.numel() >= 256:
            assert sa["momentum_buffer"].dtype == torch.uint8 and sb["momentum_buffer_absmax"].dtype == torch.float32
            off = (sa["momentum_buffer"].int() - sb["momentum_buffer"].int()).abs()
            assert off.max() <= 1 and off.float().mean() <= 2e-3, f"{int((off > 0).sum())} codes differ"
            torch.testing.assert_close(sa["momentum_buffer_absmax"], sb["momentum_buffer_absmax"], rtol=1e-5,
                                       atol=1e-7)
        else:
            assert sa["momentum_buffer"].dtype == torch.float32
        torch.testing.assert_close(p, q, rtol=0, atol=2e-4)


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_int8_checkpoint_round_trip_and_anchor_layout(fused):
    """The codes and scales saved and loaded continue bit for bit; anchor_state_dict gives torch's Muon the
    dequantized buffers, and a torch checkpoint loads back quantized."""
    opt, pa, _, _ = _int8_twins(fused, fused)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        twin_grads(pa, pa, gen)
        opt.step()
    pb = [torch.nn.Parameter(p.detach().clone()) for p in pa]
    again = fused_optim.Muon(pb, lr=0.02, fused=fused, state_dtype="int8", int8_min_numel=256)
    again.load_state_dict(saved(opt.state_dict()))
    step_twins(opt, pa, again, pb, gen, steps=2)
    for p, q in zip(pa, pb):
        assert torch.equal(p, q) and opt.state[p].keys() == again.state[q].keys()
        assert all(torch.equal(v, again.state[q][k]) for k, v in opt.state[p].items())
    anchor = torch.optim.Muon([torch.nn.Parameter(p.detach().clone().cpu()) for p in pa], lr=0.02)
    anchor.load_state_dict(saved(opt.anchor_state_dict()))
    back = fused_optim.Muon([torch.nn.Parameter(p.detach().clone()) for p in pa], lr=0.02, fused=fused,
                            state_dtype="int8", int8_min_numel=256)
    back.load_state_dict(saved(anchor.state_dict()))
    for p, q, r in zip(pa, anchor.param_groups[0]["params"], back.param_groups[0]["params"]):
        st, fp32 = opt.state[p], anchor.state[q]["momentum_buffer"]
        if p.numel() < 256:
            assert torch.equal(fp32, st["momentum_buffer"].cpu())
            continue
        want = quant.dequantize(st["momentum_buffer"].flatten(), st["momentum_buffer_absmax"], False).view(p.shape)
        assert fp32.dtype == torch.float32 and torch.equal(fp32, want.cpu())
        codes, absmax = quant.quantize(fp32.flatten(), False)
        assert torch.equal(back.state[r]["momentum_buffer"].flatten().cpu(), codes)
        assert torch.equal(back.state[r]["momentum_buffer_absmax"].cpu(), absmax)
