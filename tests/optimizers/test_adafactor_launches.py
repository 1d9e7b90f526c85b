"""Adafactor's fused path: "reduce, then apply" in at most 2 launches per param group and dtype per step, with the
reduction on the C++ engine (csrc) or in Triton, and AMP's grad_scale / found_inf through both.

Launch 1 (factored statistics) is one csrc engine launch or the Triton ROWCOL pass; launch 2 is one persistent
launch whose phases (FOLD after csrc, NORMS, APPLY / MOMENTS, CAUTIOUS_APPLY) are separated by a grid barrier. Under
the interpreter the persistent grid is 1 program, so the barrier itself is only compiled here (tools/aot.py), not
raced; these tests pin the launch structure and the numbers of every phase combination."""
import pytest
import torch

import fused_optim
from conftest import DEVICE
from helpers import assert_kernels_idle, assert_states_close, launches, train_mlp, twin_grads
from fused_optim import csrc
from fused_optim.kernels import multi_tensor as mt
from fused_optim.kernels import runtime

FACTORED = [(20, 18, 3, 1), (2, 17, 19), (33, 40)]
UNFACTORED = [(7,), (5, 3), (40,)]
CAUTIOUS = {"lr": 0.005, "betas": (0.8, 0.99), "weight_decay": 0.1, "caution": True}


def _fused_vs_reference(shapes, config, n_launches, engine_launches):
    """4 steps of fused and reference Adafactor on the same grads: launches per step, then equal states."""
    gen = torch.Generator().manual_seed(0)
    pa = [torch.randn(s, generator=gen).to(DEVICE) for s in shapes]
    pb = [p.clone() for p in pa]
    fused = fused_optim.Adafactor(pa, fused=True, **config)
    ref = fused_optim.Adafactor(pb, fused=False, **config)
    for _ in range(4):
        twin_grads(pb, pa, gen)
        assert launches(fused.step, ref.step) == (n_launches, engine_launches)
    assert_states_close(fused, pa, ref, pb, rtol=1e-5, atol=1e-6)
    assert_kernels_idle(fused)


@pytest.mark.parametrize("config", [{}, CAUTIOUS], ids=["default", "caution"])
@pytest.mark.parametrize("shapes", [FACTORED + UNFACTORED, UNFACTORED], ids=["factored", "unfactored"])
def test_launches_and_reference(reductions, shapes, config):
    factored = shapes is not UNFACTORED
    _fused_vs_reference(shapes, config, 2 if factored else 1, 1 if factored and reductions == "csrc" else 0)


@pytest.mark.parametrize("config", [{}, CAUTIOUS], ids=["default", "caution"])
def test_refused_persistent_launch_runs_one_launch_per_phase(reductions, config, monkeypatch):
    """A device that refuses the cooperative launch (here: a 2-program persistent grid under the interpreter) gets
    one launch per phase instead of a barrier: the same numbers. Phases: the statistics (ROWCOL, or the csrc
    engine and then FOLD), NORMS, APPLY (or MOMENTS, CAUTIOUS_APPLY)."""
    monkeypatch.setattr(runtime, "persistent_grid", lambda n_items, device: 2)
    monkeypatch.setattr(runtime, "refused_devices", set())
    phases = 1 + (3 if config else 2) + (reductions == "csrc")
    _fused_vs_reference(FACTORED + UNFACTORED, config, phases, 1 if reductions == "csrc" else 0)
    assert runtime.refused_devices == {str(torch.device(DEVICE))}


@pytest.mark.parametrize("config", [{}, CAUTIOUS], ids=["default", "caution"])
def test_grad_scale_and_overflow_with_factored_params(reductions, config):
    """GradScaler over a model with a factored weight: same trajectory as unscaled training, p.grad ends unscaled
    (written back once, not twice), and an overflow step changes nothing."""
    def train(fused, scaler, inf_at=None, steps=5):
        model, _, snaps = train_mlp(lambda ps: fused_optim.Adafactor(ps, fused=fused, **config), DEVICE, scaler,
                                    steps, inf_at, dims=(20, 24), check_unscaled=True)
        return model, snaps

    ref, _ = train(False, None)
    model, _ = train(True, torch.amp.GradScaler(DEVICE, init_scale=2.0 ** 10))
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    _, snaps = train(True, torch.amp.GradScaler(DEVICE, init_scale=2.0 ** 10), inf_at=2, steps=4)
    for a, b in zip(snaps[3], snaps[2]):
        assert torch.equal(a, b)
