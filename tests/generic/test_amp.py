"""torch.amp.GradScaler drives every dense optimizer: unscaling happens inside our step, an overflow step is
skipped with nothing changed, and the trajectory equals unscaled training."""
import pytest
import torch

from cases import ALL
from conftest import DEVICE
from helpers import train_mlp

DENSE = sorted({c.name: c for c in ALL if c.dense_grads and c.driver is None}.values(), key=lambda c: c.name)
# each case on its reference path and, where it has one, its fused path
PATHS = [pytest.param(c, fused, id=f"{c.name}-{'fused' if fused else 'reference'}")
         for c in DENSE for fused in (False, True) if c.kernel or not fused]


def _train(case, fused, scaler, steps=6, inf_at=None):
    kw = {"lr": 0.01} if case.name == "SGDP" else {}
    pick = (lambda ps: [p for p in ps if p.ndim == 2]) if case.name == "Muon" else list  # Muon: the matrices
    return train_mlp(lambda ps: case.cls(pick(ps), fused=fused, **{**kw, **case.configs[0]}), DEVICE, scaler, steps,
                     inf_at)


@pytest.mark.parametrize("case,fused", PATHS)
def test_grad_scaler_matches_unscaled_training(case, fused):
    ref, _, _ = _train(case, False, None)
    scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0 ** 10)
    model, _, _ = _train(case, fused, scaler)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case,fused", PATHS)
def test_grad_scaler_skips_overflow_step(case, fused):
    scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0 ** 10)
    model, opt, snaps = _train(case, fused, scaler, steps=4, inf_at=2)
    # step 2 changed nothing: params before step 3 equal params before step 2
    for a, b in zip(snaps[3], snaps[2]):
        assert torch.equal(a, b)
    assert scaler.get_scale() == 2.0 ** 9
