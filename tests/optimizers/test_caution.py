"""timm's caution on the fused path (Lion, Adopt): the element-wise apply's statistics pass (kernels/multi_tensor.py,
Note [statistics pass]) gives each tensor's cautious-mask mean, then the update uses it, in ONE persistent launch
per param group and step (2 where cooperative launches are refused). Under the interpreter the persistent grid is 1
program, so the barrier itself is only compiled here (tools/aot.py), not raced; these tests pin the launch
structure, the statistics themselves, the numbers against the reference path, and the buffers left behind."""
import pytest
import torch

import fused_optim
from anchors import timm_class
from conftest import DEVICE
from helpers import assert_kernels_idle, assert_states_close, kernel_tables
from fused_optim.kernels import runtime

# several chunks per tensor under the test block size (256 x 2), odd sizes, 1-element, 0-d and empty
SHAPES = [(600,), (7, 5), (1,), (), (0,), (3, 2, 3, 3)]
CONFIGS = {"Lion": {"lr": 0.01, "weight_decay": 0.1, "caution": True},
           "Adopt": {"lr": 0.01, "weight_decay": 0.1, "decoupled": True, "caution": True}}


def _params(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(s, generator=gen, dtype=torch.float64) * 2 - 1).add_(0.1).to(dtype).to(DEVICE)
            for s in SHAPES]


def _grads(params, gen):
    return [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype).to(DEVICE) for p in params]


def _pair(name, dtype=torch.float32, **extra):
    cls = getattr(fused_optim, name)
    pa, pb = _params(dtype), _params(dtype)
    cfg = {**CONFIGS[name], **extra}
    return cls(pa, fused=True, **cfg), pa, cls(pb, fused=False, **cfg), pb


def _step_both(fused, pa, ref, pb, gen, **kw):
    for a, b, g in zip(pa, pb, _grads(pa, gen)):
        a.grad, b.grad = g.clone(), g.clone()
    n0 = runtime.launch_count
    fused.step(**kw)
    ref.step(**kw)
    return runtime.launch_count - n0


@pytest.mark.parametrize("name", ["Lion", "Adopt"])
def test_one_launch_and_the_mask_means(name):
    """One launch per step; after it, the statistics buffer holds each tensor's cautious-mask count of that step and
    its numel (at least 1): their ratio is the mask's mean (recomputed here from the reference's states before the
    step), 0 for the empty tensor."""
    fused, pa, ref, pb = _pair(name)
    gen = torch.Generator().manual_seed(1)
    beta1 = CONFIGS[name].get("betas", (0.9,))[0]
    for step in range(4):
        grads = _grads(pa, gen)
        if step > 0:  # (Adopt's first step takes no update)
            if name == "Lion":
                updates = [torch.lerp(ref.state[b]["exp_avg"], g, 1 - beta1).sign() for b, g in zip(pb, grads)]
            else:
                st = [ref.state[b] for b in pb]
                normed = [(g / s["exp_avg_sq"].sqrt().clamp(min=1e-6)).clamp(-c, c) for g, s, c in
                          zip(grads, st, [(float(s["step"])) ** 0.333 for s in st])]
                updates = [torch.lerp(s["exp_avg"], n, 1 - beta1) for s, n in zip(st, normed)]
            expected = [float((u * g > 0).float().mean()) if g.numel() else 0.0 for u, g in zip(updates, grads)]
        for a, b, g in zip(pa, pb, grads):
            a.grad, b.grad = g.clone(), g.clone()
        n0 = runtime.launch_count
        fused.step()
        assert runtime.launch_count - n0 == 1
        ref.step()
        (tab,) = kernel_tables(fused)
        if step > 0:
            assert tab.stats[:, 1].tolist() == [max(1, g.numel()) for g in grads]
            assert (tab.stats[:, 0] / tab.stats[:, 1]).tolist() == pytest.approx(expected, rel=1e-6, abs=0)
            if step > 1:  # (the first update of each agrees with its grad everywhere)
                assert 0 < expected[0] < 1  # the mask did mask (the 600-element tensor)
        assert_states_close(fused, pa, ref, pb, rtol=1e-5, atol=1e-6)
        assert_kernels_idle(fused)


@pytest.mark.parametrize("name", ["Lion", "Adopt"])
def test_refused_cooperative_launch_runs_two_launches_with_the_same_numbers(name, monkeypatch):
    monkeypatch.setattr(runtime, "persistent_grid", lambda n_items, device: 2)  # the interpreter refuses 2
    monkeypatch.setattr(runtime, "refused_devices", set())
    fused, pa, ref, pb = _pair(name)
    gen = torch.Generator().manual_seed(2)
    counts = [_step_both(fused, pa, ref, pb, gen) for _ in range(3)]
    assert counts == [2, 2, 2]  # the statistics pass, then the update (the refused try launched nothing)
    assert runtime.refused_devices == {str(pa[0].device)}
    assert_states_close(fused, pa, ref, pb, rtol=1e-5, atol=1e-6)
    assert_kernels_idle(fused)


@pytest.mark.parametrize("name", ["Lion", "Adopt"])
def test_without_caution_one_plain_launch_and_no_statistics_buffers(name):
    fused, pa, ref, pb = _pair(name, caution=False)
    gen = torch.Generator().manual_seed(3)
    assert [_step_both(fused, pa, ref, pb, gen) for _ in range(3)] == [1, 1, 1]
    assert all(t.partials is None and t.barrier is None for t in kernel_tables(fused))
    assert_states_close(fused, pa, ref, pb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opts", [{"master_weights": True}, {"stochastic_rounding": True}, {"max_grad_norm": 1.0}],
                         ids=["master", "sr", "clip"])
@pytest.mark.parametrize("name", ["Lion", "Adopt"])
def test_caution_with_precision_options_and_amp(name, opts):
    """bf16 params with an fp32 master copy / stochastic rounding (still one launch), and global grad-norm clipping
    with AMP scaling (the clip's two launches, then one), against the reference path."""
    clip = "max_grad_norm" in opts
    dtype = torch.float32 if clip else torch.bfloat16
    fused, pa, ref, pb = _pair(name, dtype, **opts)
    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(0)
    amp = dict(grad_scale=torch.tensor(8.0, device=DEVICE), found_inf=torch.tensor(0.0, device=DEVICE)) if clip \
        else {}
    counts = [_step_both(fused, pa, ref, pb, gen, **amp) for _ in range(3)]
    assert counts == [3 if clip else 1] * 3
    if "master_weights" in opts:
        assert_states_close(fused, pa, ref, pb, rtol=1e-5, atol=1e-6)  # master copies and fp32 states
        for p in pa:
            assert torch.equal(p.detach(), fused.state[p]["master_param"].to(torch.bfloat16))
    elif clip:
        assert_states_close(fused, pa, ref, pb, rtol=1e-5, atol=1e-6)
    else:  # stochastic rounding: both paths round at random (at most a bf16 ulp, 2^-7 relative, a step each)
        for a, b in zip(pa, pb):
            torch.testing.assert_close(a.float(), b.float(), rtol=10 * 2 ** -7, atol=1e-3)


@pytest.mark.parametrize("name,kw,message", [
    ("Lion", {"lr": -1.0}, "Invalid learning rate: -1.0"),
    ("Lion", {"betas": (0.9, 1.0)}, "Invalid beta parameter at index 1: 1.0"),
    ("Lion", {"lr": 0.0, "corrected_weight_decay": True}, "Corrected weight decay requires a positive max lr"),
    ("Adopt", {"eps": -1e-6}, "Invalid epsilon value: -1e-06"),
    ("Adopt", {"lr": torch.tensor(0.1), "foreach": True}, "lr as a Tensor is not supported"),
    ("Adopt", {"lr": torch.tensor([0.1, 0.2])}, "Tensor lr must be 1-element"),
])
def test_timm_refusals_before_any_state(name, kw, message):
    """timm's refusals in timm's words (the anchor refuses the same), at construction."""
    anchor = timm_class(name.lower(), name)
    for cls in (getattr(fused_optim, name), anchor):
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            cls([torch.nn.Parameter(torch.randn(3))], **kw)


def test_timm_factory_names():
    """timm's create_optimizer names for Lion and Adopt build our class with timm's option defaults."""
    p = [torch.nn.Parameter(torch.randn(3))]
    cases = {"lion": ("Lion", {}), "clion": ("Lion", {"caution": True}),
             "lionc": ("Lion", {"corrected_weight_decay": True}), "adopt": ("Adopt", {}),
             "adoptw": ("Adopt", {"decoupled": True}),
             "cadoptc": ("Adopt", {"decoupled": True, "caution": True, "corrected_weight_decay": True})}
    for name, (cls, expected) in cases.items():
        opt = fused_optim.create_optimizer(p, name, lr=0.1)
        assert type(opt) is getattr(fused_optim, cls), name
        assert {k: opt.defaults[k] for k in expected} == expected, name
