"""SGDP / AdamP's fused path: "reduce, then apply" in exactly 2 launches per param group and dtype per step, with and
without caution, whatever the number of tensors.

Launch 1 is the C++ engine's projection statistics (csrc KIND_PROJ: per-row stats, projection decision) or, where it
is not built, the Triton kernel's pass 0 (the same); launch 2 is pass 2 (apply), or with caution ONE persistent
launch running pass 1 (caution stats) and pass 2 separated by a grid barrier. Under the interpreter the persistent
grid is 1 program, so the barrier itself is only compiled here (tools/aot.py), not raced; these tests pin the launch
structure, the numbers (every step, against the reference path) and the buffers left behind."""
import pytest
import torch

import fused_optim
from conftest import DEVICE
from fused_optim import csrc
from helpers import (assert_kernels_idle, assert_states_close, kernel_tables, launches, refuse_persistent_launch,
                     train_mlp, twin_groups)
from fused_optim.kernels import multi_tensor as mt
from fused_optim.kernels import runtime
from fused_optim.optimizers.projection import CHANNEL, LAYER, projection_mode

# 1-D, 2-D, 4-D, odd sizes; several row blocks and column tiles per tensor under the test block size
SHAPES = [(7,), (1,), (300,), (5, 3), (67, 33), (2, 9), (4, 3, 3, 3), (6, 2, 3, 3)]
SHAPES_2 = [(11,), (3, 4, 2, 2), (13, 5)]
CONFIGS = {
    "SGDP": {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
    "AdamP": {"lr": 0.01, "weight_decay": 0.1, "eps": 1e-6},
}


def _grad(p, kind, gen):
    """A random grad; for 2+-D params orthogonal to the weight per row (kind 1), for the whole tensor (kind 2), or
    not (kind 0), so every projection mode happens."""
    r = torch.randn(p.shape, generator=gen, dtype=torch.float64)
    if p.dim() < 2 or kind == 0:
        return r
    q = p.detach().to("cpu", torch.float64)
    pv = q.reshape(q.shape[0], -1) if kind == 1 else q.reshape(1, -1)
    rv = r.reshape(pv.shape)
    return (rv - pv * (rv * pv).sum(1, keepdim=True) / (pv * pv).sum(1, keepdim=True)).reshape(p.shape)


@pytest.mark.parametrize("caution", [False, True], ids=["plain", "caution"])
@pytest.mark.parametrize("name", ["SGDP", "AdamP"])
def test_two_launches_and_reference(name, caution, reductions):
    cls = getattr(fused_optim, name)
    cfg = {**CONFIGS[name], "caution": caution}
    fused, pa, ref, pb, gen = twin_groups(cls, cfg, {"lr": 0.02, "weight_decay": 0.0}, SHAPES, SHAPES_2, DEVICE)
    modes = set()
    for step in range(5):
        for i, (a, b) in enumerate(zip(pa, pb)):
            g = _grad(a, (step + i) % 3, gen)
            a.grad = g.to(a.dtype).to(DEVICE)
            b.grad = a.grad.clone()
        # 2 per group, whatever the tensor count; launch 1 on the C++ engine (its host build here) or as the Triton
        # kernel's pass 0
        groups = len(fused.param_groups)
        assert launches(fused.step, ref.step) == (2 * groups, groups if reductions == "csrc" else 0)
        for a, b in zip(pa, pb):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"step {step}")
        for tab in kernel_tables(fused):
            modes.update(tab.tmode.tolist())
    assert {float(CHANNEL), float(LAYER)} <= modes  # both projections happened on the fused path
    assert_states_close(fused, pa, ref, pb, rtol=1e-5, atol=1e-6)
    assert_kernels_idle(fused)


@pytest.mark.parametrize("name", ["SGDP", "AdamP"])
def test_refused_persistent_launch_runs_one_launch_per_phase(name, reductions, monkeypatch):
    """caution's pass 1 + 2 on a device that refuses the cooperative launch: pass 1 and pass 2 run as two launches,
    with the reference's numbers and decisions."""
    cls = getattr(fused_optim, name)
    gen = torch.Generator().manual_seed(1)
    pa = [torch.randn(s, generator=gen).to(DEVICE) for s in [(7,), (5, 3), (13, 5), (3, 4, 2, 2)]]
    pb = [p.clone() for p in pa]
    refuse_persistent_launch(monkeypatch, DEVICE)
    fused = cls(pa, fused=True, caution=True, **CONFIGS[name])
    ref = cls(pb, fused=False, caution=True, **CONFIGS[name])
    modes = set()
    for step in range(3):
        for i, (a, b) in enumerate(zip(pa, pb)):
            a.grad = _grad(a, (step + i) % 3, gen).to(a.dtype).to(DEVICE)
            b.grad = a.grad.clone()
        expected = [projection_mode(b, b.grad, ref.defaults["delta"], ref.defaults["eps"]) for b in pb]
        # the statistics, then pass 1 and pass 2 each on its own
        assert launches(fused.step, ref.step) == (3, int(reductions == "csrc"))
        for a, b in zip(pa, pb):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"step {step}")
        (tab,) = kernel_tables(fused)
        decided = dict(zip(tab.order, tab.tmode.tolist()))
        assert [decided[i] for i in range(len(pa))] == expected, step
        modes.update(expected)
    assert {CHANNEL, LAYER} <= modes
    assert runtime.refused_devices == {str(pa[0].device)}
    assert_states_close(fused, pa, ref, pb, rtol=1e-5, atol=1e-6)
    assert_kernels_idle(fused)


def test_persistent_grid_is_one_program_under_the_interpreter():
    if DEVICE == "cpu":
        assert runtime.persistent_grid(100, torch.device("cpu")) == 1
    else:
        sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count
        assert runtime.persistent_grid(10 ** 6, torch.device(DEVICE)) == sms
        assert runtime.persistent_grid(3, torch.device(DEVICE)) == 3


@pytest.mark.parametrize("name", ["SGDP", "AdamP"])
def test_grad_scale_and_overflow_with_caution(name, reductions):
    """GradScaler with caution (the persistent pass 1+2 launch): same trajectory as unscaled training, p.grad ends
    unscaled (written back once, not twice), and an overflow step changes nothing."""
    cls = getattr(fused_optim, name)
    kw = {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.1} if name == "SGDP" else {"lr": 0.01, "weight_decay": 0.1}

    def train(fused, scaler, inf_at=None, steps=5):
        model, opt, snaps = train_mlp(lambda ps: cls(ps, fused=fused, caution=True, **kw), DEVICE, scaler, steps,
                                      inf_at, check_unscaled=True)
        return model, opt, snaps

    ref, _, _ = train(False, None)
    model, opt, _ = train(True, torch.amp.GradScaler(DEVICE, init_scale=2.0 ** 10))
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert_kernels_idle(opt)
    _, _, snaps = train(True, torch.amp.GradScaler(DEVICE, init_scale=2.0 ** 10), inf_at=2, steps=4)
    for a, b in zip(snaps[3], snaps[2]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["SGDP", "AdamP"])
def test_engine_and_triton_stats_agree_in_low_precision(name, dtype, monkeypatch):
    """bf16 / fp16 params, grads and states, caution on: launch 1 on the C++ engine and as Triton's pass 0 take the
    same decisions every step, and the trajectories agree to within bf16 / fp16 rounding (the two sum the rows'
    statistics in different orders, so an element may round the other way now and then; on CPU they were equal)."""
    from fused_optim.kernels import reduce

    if not reduce.use_csrc(torch.device(DEVICE)):
        pytest.skip("the csrc module is not built here (bash scripts/build_csrc.sh)")
    runs = {}
    for backend in ("csrc", "triton"):
        monkeypatch.setattr(reduce, "BACKEND", backend)
        gen = torch.Generator().manual_seed(0)
        ps = [torch.randn(s, generator=gen).to(DEVICE, dtype) for s in SHAPES]
        opt = getattr(fused_optim, name)(ps, fused=True, caution=True, **CONFIGS[name])
        modes = []
        for step in range(6):
            for i, p in enumerate(ps):
                p.grad = _grad(p, (step + i) % 3, gen).to(DEVICE, dtype)
            opt.step()
            (tab,) = kernel_tables(opt)
            modes.append(dict(zip(tab.order, tab.tmode.tolist())))
        runs[backend] = ps, modes
    (pa, ma), (pb, mb) = runs["csrc"], runs["triton"]
    assert ma == mb and {float(CHANNEL), float(LAYER)} <= set().union(*(m.values() for m in ma))
    ulp = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a.float(), b.float(), rtol=4 * ulp, atol=4 * ulp)
