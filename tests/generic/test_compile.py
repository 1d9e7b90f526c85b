"""torch.compile: step() runs eagerly (torch.compiler.disable), so a compiled model keeps whole graphs and trains
exactly like the eager model; a compiled training step that calls opt.step() breaks the graph only there."""
import pytest
import torch

import fused_optim
from conftest import DEVICE
from helpers import mse_step


def _setup(fused):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1)).to(DEVICE)
    opt = fused_optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    g = torch.Generator().manual_seed(1)
    return model, opt, torch.randn(32, 8, generator=g).to(DEVICE), torch.randn(32, 1, generator=g).to(DEVICE)


def _train(model, opt, x, y, forward, steps=4):
    for _ in range(steps):
        mse_step(opt, forward, x, y)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_compiled_model_trains_like_eager(fused):
    torch._dynamo.reset()
    model, opt, x, y = _setup(fused)
    eager = _train(model, opt, x, y, model)
    model, opt, x, y = _setup(fused)
    explain = torch._dynamo.explain(model)(x)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    compiled = _train(model, opt, x, y, torch.compile(model, backend="eager"))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_compiled_training_step_breaks_only_at_the_optimizer():
    torch._dynamo.reset()
    model, opt, x, y = _setup(False)

    def train_step(x, y):
        return mse_step(opt, model, x, y)

    explain = torch._dynamo.explain(train_step)(x, y)
    assert explain.graph_break_count <= 2  # backward() and the disabled step(); nothing inside step() is traced
    model2, opt2, x2, y2 = _setup(False)
    eager = _train(model2, opt2, x2, y2, model2, steps=3)
    torch._dynamo.reset()
    model, opt, x, y = _setup(False)
    step = torch.compile(train_step, backend="eager")
    for _ in range(3):
        step(x, y)
    for a, b in zip(model.parameters(), eager):
        torch.testing.assert_close(a.detach(), b, rtol=1e-6, atol=1e-7)
