"""Long trajectories against timm (bench/trajectories.py's problems): Adafactor on timm's Rosenbrock test, SGDP on
a scale-invariant least-squares problem with a 10x5 weight. The reference path follows timm bit for bit; so does
Adafactor's fused path, once the kernel rounds as torch does (fp64 hyper-parameters exact under the interpreter,
the moments' lerp as one fma, the update RMS and clip factor in fp32). Where the fused trajectory parted from timm
before, the float32 problem itself amplifies roundings: timm's own float32 and float64 runs part the same way."""
import importlib.util
import pathlib

import pytest
import torch

from fused_optim.kernels import runtime

_spec = importlib.util.spec_from_file_location(
    "trajectories", pathlib.Path(__file__).parents[2] / "bench" / "trajectories.py")
traj = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(traj)


def _max_diff(a, b):
    return max((x[0] - y[0]).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("problem", ["adafactor", "sgdp"])
def test_reference_follows_timm_bit_for_bit(problem):
    """fused=False in float32: timm's numbers at every one of 300 steps."""
    hist = traj.trajectories(problem, 300, torch.float32, labels=("timm", "reference"))
    assert traj.first_difference(hist["timm"], hist["reference"]) is None


def test_adafactor_rosenbrock_amplifies_rounding():
    """timm in float32 and in float64 differ in the last bits from step 3, stay within 1e-5 of each other to step
    125 and are 0.1 or more apart by step 300: any rounding difference grows to O(1) on this problem."""
    hist = traj.trajectories("adafactor", 300, torch.float32, labels=("timm", "timm64"))
    assert traj.first_difference(hist["timm"], hist["timm64"]) < 5
    assert _max_diff(hist["timm"][:125], hist["timm64"][:125]) < 1e-5
    assert _max_diff(hist["timm"][200:], hist["timm64"][200:]) > 0.1


@pytest.mark.skipif(not runtime.available(), reason="needs triton")
@pytest.mark.parametrize("steps", [3, 6, 154])
def test_adafactor_fused_step_is_timms(steps):
    """From timm's state after `steps` steps, one fused step gives timm's param and second moment in every bit. The
    steps are where the fused trajectory first parted before: the moment at step 4 (decay_rate rounded to fp32
    under the interpreter), at step 7 (the lerp rounded twice), the param at step 155 (the clip factor from an fp64
    RMS). bench/trajectories.py: the whole 300-step trajectory is timm's since."""
    (timm, p), (fused, q) = traj.runs("adafactor", torch.float32, labels=("timm", "fused")).values()
    for step in range(steps):
        p.grad = traj.rosenbrock_grad(p.detach(), step)
        timm.step()
    q.grad = torch.ones_like(q)
    fused.step()  # the fused state (a device step count), then timm's values in it
    with torch.no_grad():
        q.copy_(p)
    fused.state[q]["step"].fill_(steps)
    fused.state[q]["exp_avg_sq"].copy_(timm.state[p]["exp_avg_sq"])
    p.grad = traj.rosenbrock_grad(p.detach(), steps)
    q.grad = p.grad.clone()
    timm.step()
    fused.step()
    assert torch.equal(p, q)
    assert torch.equal(timm.state[p]["exp_avg_sq"], fused.state[q]["exp_avg_sq"])


@pytest.mark.skipif(not runtime.available(), reason="needs triton")
def test_sgdp_fused_unprojected_step_is_timms():
    """Where nothing is projected (a 1-D param) the fused SGDP step is timm's in every bit: the update adds
    -lr * d to the decayed param in one fma, as timm's p.add_(d, alpha=-lr) (before: two roundings)."""
    gen = torch.Generator().manual_seed(1)
    start = torch.randn(37, generator=gen)
    ps = {k: torch.nn.Parameter(start.clone()) for k in ("timm", "fused")}
    opts = {"timm": traj.anchors.timm_module("sgdp").SGDP([ps["timm"]], **traj.SGDP),
            "fused": traj.fused_optim.SGDP([ps["fused"]], fused=True, **traj.SGDP)}
    for _ in range(4):
        g = torch.randn(37, generator=gen)
        for k, opt in opts.items():
            ps[k].grad = g.clone()
            opt.step()
        assert torch.equal(ps["timm"], ps["fused"])
