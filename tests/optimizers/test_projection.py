"""SGDP / AdamP projections really happen (and the fused path decides like the reference); Adahessian's fused path,
its options outside the generic matrix, its seeded generator, and its errors."""

import pytest
import torch

import fused_optim
from anchors import timm_class
from cases import clone_params, make_params, param_groups, reference, run, twins  # first: cases imports every cases_*.py itself
from cases import adahessian, projection  # noqa: E402,I001
from conftest import DEVICE
from helpers import assert_states_close, assert_unchanged, kernel_tables, saved, snapshot
from fused_optim.kernels import multi_tensor as mt
from fused_optim.kernels import runtime
from fused_optim.optimizers.projection import CHANNEL, LAYER, NONE, projection_mode

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
CASE = {c.name: c for c in projection.CASES + adahessian.CASES}


@pytest.mark.parametrize("name,config", [("SGDP", CASE["SGDP"].configs[1]), ("AdamP", CASE["AdamP"].configs[2])])
def test_projection_driver_covers_every_mode_vs_timm(name, config):
    """Reference vs timm (float64) on the driver's grads, and every mode happened on 2-D and 4-D weights."""
    case = CASE[name]
    ours, pa, theirs, pb = twins(case, config, reference(case, config))
    projection.MODES.clear()
    for i in range(case.steps):
        run(case, [ours, theirs], [pa, pb], steps=1, seed=i)
        assert_states_close(ours, pa, theirs, pb, 1e-10, 1e-12)
    for dim in (2, 4):
        for mode in (NONE, CHANNEL, LAYER):
            assert projection.MODES[(dim, mode)] >= 3, (dim, mode, dict(projection.MODES))


@pytest.mark.parametrize("name,config", [("SGDP", CASE["SGDP"].configs[2]), ("AdamP", CASE["AdamP"].configs[1])])
def test_fused_decides_like_the_reference(name, config, reductions):
    """The kernel's per-tensor mode (read from its table) equals the reference's decision, every step (decided by
    the C++ engine or by the Triton kernel's pass 0)."""
    case = CASE[name]
    ps = make_params(case, torch.float32, DEVICE)[0]
    opt = case.cls(ps, fused=True, **config)
    gen = torch.Generator().manual_seed(3)
    seen = set()
    for step in range(6):
        before = [p.detach().clone() for p in ps]
        projection.projection_driver([opt], [ps], step, gen)
        expected = [projection_mode(p, q.grad, opt.defaults["delta"], opt.defaults["eps"])
                    for p, q in zip(before, ps)]
        (tab,) = kernel_tables(opt)
        modes = dict(zip(tab.order, tab.tmode.cpu().tolist()))
        assert [modes[i] for i in range(len(ps))] == expected, step
        seen.update(expected)
    assert seen == {NONE, CHANNEL, LAYER}


@pytest.mark.parametrize("caution,launches", [(False, 2), (True, 2)])
@pytest.mark.parametrize("n_tensors", [3, 12])
def test_launches_per_group_step_independent_of_tensor_count(caution, launches, n_tensors):
    ps = [torch.randn(4 + i, 3 + i % 4, device=DEVICE) for i in range(n_tensors)]
    opt = fused_optim.AdamP(ps, lr=0.01, weight_decay=0.1, caution=caution, fused=True)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    n0 = runtime.launch_count
    for _ in range(2):
        opt.step()
    assert runtime.launch_count - n0 == 2 * launches


def test_projection_steady_state_uploads_nothing():
    ps = [torch.randn(6, 5, device=DEVICE), torch.randn(7, device=DEVICE)]
    opt = fused_optim.SGDP(ps, lr=0.1, momentum=0.9, fused=True)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    (cache,) = opt._kernel_caches.values()
    builds, uploads = cache.builds, cache.grad_uploads
    for p in ps:
        p.grad.copy_(torch.randn_like(p))  # same addresses: nothing to upload
    opt.step()
    assert (cache.builds, cache.grad_uploads) == (builds, uploads)
    for p in ps:
        p.grad = torch.randn_like(p)  # new grads: only their addresses go up
    opt.step()
    assert (cache.builds, cache.grad_uploads) == (builds, uploads + 1)


def test_adamp_fused_checkpoint_loads_into_timm():
    """The fused path keeps `step` as a float32 device tensor: timm's AdamP still runs on it."""
    ps = [torch.randn(5, 4, device=DEVICE) for _ in range(2)]
    ours = fused_optim.AdamP(ps, lr=0.01, fused=True)
    for p in ps:
        p.grad = torch.randn_like(p)
    ours.step()
    qs = [p.detach().cpu().double() for p in ps]
    theirs = timm_class("adamp", "AdamP")(qs, lr=0.01)
    theirs.load_state_dict(saved(ours.state_dict()))  # a real checkpoint: timm's `step += 1` must not alias our step
    for p, q in zip(ps, qs):
        g = torch.randn_like(p)
        p.grad, q.grad = g, g.cpu().double()
    ours.step()
    theirs.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p.cpu().double(), q, rtol=1e-5, atol=1e-6)


# ---- Adahessian ------------------------------------------------------------------------------------------------
AH = CASE["Adahessian"]


def _adahessian_pair(config, dtype=torch.float32, fused=True):
    return twins(AH, config, lambda gs: AH.cls(gs, fused=fused, **config), reference(AH, config), dtype, DEVICE)


@pytest.mark.parametrize("config", AH.configs + [{"update_each": 2, "hessian_power": 0.0, "weight_decay": 0.1}],
                         ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_adahessian_fused_matches_reference(config):
    fused, pa, ref, pb = _adahessian_pair(config)
    n0 = runtime.launch_count
    run(AH, [fused, ref], [pa, pb])
    assert_states_close(fused, pa, ref, pb, rtol=1e-5, atol=1e-6)
    assert runtime.launch_count - n0 == len(fused.param_groups) * AH.steps
    for p, q in zip(pa, pb):
        torch.testing.assert_close(p.hess, q.hess, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", [{"update_each": 2}, {"update_each": 3, "n_samples": 3, "avg_conv_kernel": True}],
                         ids=["update_each=2", "update_each=3-n_samples=3-avg_conv_kernel"])
def test_adahessian_update_each_vs_timm(config):
    ours, pa, theirs, pb = twins(AH, config, reference(AH, config))
    for i in range(7):
        run(AH, [ours, theirs], [pa, pb], steps=1, seed=i)
        assert_states_close(ours, pa, theirs, pb, 1e-10, 1e-12)
        for p, q in zip(pa, pb):
            torch.testing.assert_close(p.hess, q.hess, rtol=1e-10, atol=1e-12)


def test_adahessian_default_generator_matches_timm():
    """Without the driver's reseeding: the same seed and the same draws as timm, step after step."""
    a = [torch.randn(4, 3, dtype=torch.float64, requires_grad=True), torch.randn(5, dtype=torch.float64,
                                                                                 requires_grad=True)]
    b = clone_params(a)
    ours, theirs = fused_optim.Adahessian(a, n_samples=2), timm_class("adahessian", "Adahessian")(b, n_samples=2)
    for _ in range(3):
        for opt, ps in ((ours, a), (theirs, b)):
            loss = sum((torch.sin(p) * torch.arange(p.numel(), dtype=p.dtype).view(p.shape)).sum() for p in ps)
            for p, g in zip(ps, torch.autograd.grad(loss, ps, create_graph=True)):
                p.grad = g
            opt.step()
        assert_states_close(ours, a, theirs, b, 1e-12, 1e-14)


def test_adahessian_needs_the_graph():
    p = torch.randn(4, 3, requires_grad=True)
    opt = fused_optim.Adahessian([p])
    p.grad = torch.randn(4, 3)  # a plain grad: no graph to differentiate
    snap = snapshot(opt, [p])
    with pytest.raises(RuntimeError, match="create_graph=True"):
        opt.step()
    assert_unchanged(opt, [p], snap)
    assert opt.state[p] == {"hessian step": 0}


def test_adahessian_refuses_amp_arguments():
    p = torch.randn(3, requires_grad=True)
    opt = fused_optim.Adahessian([p])
    with pytest.raises(RuntimeError, match="grad_scale"):
        opt.step(grad_scale=torch.tensor(2.0), found_inf=torch.tensor(0.0))


def test_adahessian_fused_bf16_tracks_fp32():
    """bf16 params: the fused path keeps p.hess in bf16 (one dtype for the kernel's state slots) and stays within
    a few percent of the fp32 reference over 10 steps."""
    fused, pa, _, _ = _adahessian_pair({}, torch.bfloat16)
    e1, e2 = make_params(AH, torch.float32, DEVICE)
    exact = AH.cls(param_groups(AH, {}, e1, e2), fused=False)
    run(AH, [fused, exact], [pa, e1 + e2], steps=10)
    num = sum(((p.float() - e) ** 2).sum() for p, e in zip(pa, e1 + e2))
    den = sum((e ** 2).sum() for e in e1 + e2)
    assert float((num / den).sqrt()) < 0.05
    assert all(p.hess.dtype == torch.bfloat16 for p in pa if isinstance(p.hess, torch.Tensor))
