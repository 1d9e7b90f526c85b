"""max_grad_norm: global grad-norm clipping inside the step, equal to torch.nn.utils.clip_grad_norm_ before it.

The reference path calls clip_grad_norm_ itself; the fused path folds the clip coefficient into the kernels' grad
scale (kernels/reduce.py), computed on the device by the C++ engine (its host build on CPU) or by Triton. Both are
checked against "clip_grad_norm_, then the same optimizer without max_grad_norm" over 20 steps on every dense case's
shapes (odd sizes, 0-d, empty, 4-D), with max_grad_norm set so that some steps clip and others do not."""
import pytest
import torch

import fused_optim
from cases import ALL, reference, twins
from conftest import DEVICE
from helpers import assert_states_close, assert_unchanged, snapshot
from fused_optim.kernels import multi_tensor as mt
from fused_optim.kernels import runtime

# (an anchor's own max_grad_norm, timm's Lamb's, is its own case's option)
DENSE = sorted({c.name: c for c in ALL if c.dense_grads and c.driver is None and not c.cls.anchor_max_grad_norm}
                .values(), key=lambda c: c.name)
STEPS = 20


def _grads(params, gen, step):
    # random non-zero grads whose global norm is 1 every third step, else 4: across max_grad_norm=2 both ways
    gs = [torch.randn(p.shape, generator=gen, dtype=torch.float64).add_(0.01) for p in params]
    target = 1.0 if step % 3 == 0 else 4.0
    return [g * (target / _norm(gs)) for g in gs]


def _norm(grads):
    return float(torch.linalg.vector_norm(torch.stack([g.double().norm() for g in grads]))) if grads else 0.0


def _run_pair(case, config, fused, max_norm):
    """Ours with max_grad_norm vs ours without it after clip_grad_norm_; returns both and the norms seen."""
    ours, pa, plain, pb = twins(case, config, lambda gs: case.cls(gs, fused=fused, max_grad_norm=max_norm, **config),
                                reference(case, config), torch.float32, DEVICE)
    gen, norms = torch.Generator().manual_seed(1), []
    for step in range(STEPS):
        grads = _grads(pa, gen, step)
        for p, q, g in zip(pa, pb, grads):
            p.grad = g.to(device=DEVICE, dtype=p.dtype)
            q.grad = g.to(device=DEVICE, dtype=q.dtype)
        norms.append(_norm([p.grad for p in pa]))
        torch.nn.utils.clip_grad_norm_(pb, max_norm)
        ours.step()
        plain.step()
        torch.testing.assert_close(ours.last_grad_norm.double().cpu(), torch.tensor(norms[-1], dtype=torch.float64),
                                   rtol=1e-5, atol=0)
        for p, q in zip(pa, pb):  # like clip_grad_norm_, the step leaves the clipped grads in p.grad
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    return ours, pa, plain, pb, norms


@pytest.mark.parametrize("case", DENSE, ids=lambda c: c.name)
def test_reference_equals_clip_grad_norm_then_step(case):
    config = case.configs[-1]
    ours, pa, plain, pb, norms = _run_pair(case, config, False, max_norm=2.0)
    assert min(norms) < 2.0 < max(norms)  # both branches of the clip were taken
    assert_states_close(ours, pa, plain, pb, rtol=1e-6, atol=1e-7)


# Both reduction backends (the C++ engine, Triton) for the families whose own step reduces too, and for Adam and
# SGD; the other element-wise families differ only in the apply, which both backends feed the same scale: Triton.
# Adafactor: Triton (its slowest case under the interpreter; its own reductions run on both backends in
# tests/optimizers/test_adafactor_launches.py, and the clip's sums on the engine are the ones tested here).
CLIP_RUNS = [(c, b) for c in DENSE if c.kernel
             for b in (("csrc", "triton") if (not c.cls.elementwise and c.name != "Adafactor")
                       or c.name in ("Adam", "SGD") else ("triton",))]


@pytest.mark.parametrize("case, reductions", CLIP_RUNS, ids=lambda x: getattr(x, "name", x), indirect=["reductions"])
def test_fused_equals_clip_grad_norm_then_step(case, reductions):
    config = case.configs[-1]
    n0 = runtime.launch_count
    ours, pa, plain, pb, norms = _run_pair(case, config, True, max_norm=2.0)
    assert min(norms) < 2.0 < max(norms)
    assert_states_close(ours, pa, plain, pb, rtol=1e-5, atol=1e-6)
    # clipping adds one reduction launch (per grad dtype on the Triton path; one dtype here) and one scale launch
    groups = len(ours.param_groups)
    assert runtime.launch_count - n0 <= STEPS * (groups * case.launches + 2) + groups


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_clip_with_grad_scaler_equals_unscaled_clip(fused, reductions):
    def train(scaler):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(DEVICE)
        opt = fused_optim.AdamW(model.parameters(), lr=0.05, fused=fused, max_grad_norm=0.1)
        x, y = torch.randn(32, 6, device=DEVICE), torch.randn(32, 1, device=DEVICE)
        norms = []
        for _ in range(6):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            norms.append(float(opt.last_grad_norm))
        return model, norms

    ref, ref_norms = train(None)
    model, norms = train(torch.amp.GradScaler(DEVICE, init_scale=2.0 ** 12))
    assert min(ref_norms) > 0.1  # the clip is active
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=1e-5, atol=0)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_clip_overflow_step_changes_nothing(reductions):
    params = [torch.nn.Parameter(torch.randn(5, 3, device=DEVICE) + 0.1), torch.nn.Parameter(torch.randn(7, device=DEVICE))]
    opt = fused_optim.Adam(params, fused=True, max_grad_norm=1.0)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    snap = snapshot(opt, params)
    params[0].grad[0, 0] = float("inf")
    opt.step(grad_scale=torch.tensor(4.0, device=DEVICE), found_inf=torch.tensor(1.0, device=DEVICE))
    assert_unchanged(opt, params, snap)


def test_adahessian_clips_after_the_hessian_products():
    case = next(c for c in ALL if c.name == "Adahessian")
    results = []
    for fused, max_norm in ((False, None), (False, 0.05), (True, 0.05)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(DEVICE)
        opt = case.cls(model.parameters(), lr=0.1, fused=fused, max_grad_norm=max_norm)
        x, y = torch.randn(16, 6, device=DEVICE), torch.randn(16, 1, device=DEVICE)
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward(create_graph=True)
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    unclipped, ref, fused = results
    assert any(not torch.allclose(a, b, rtol=1e-3) for a, b in zip(unclipped, ref))  # the clip changed the run
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), True, "1"])
def test_invalid_max_grad_norm_is_refused(value):
    with pytest.raises(ValueError, match="max_grad_norm"):
        fused_optim.Adam([torch.nn.Parameter(torch.ones(3))], max_grad_norm=value)


@pytest.mark.parametrize("name", ["SparseAdam", "LBFGS"])
def test_max_grad_norm_refused_where_unsupported(name):
    with pytest.raises(ValueError, match="does not support max_grad_norm"):
        fused_optim.REGISTRY[name.lower()]([torch.nn.Parameter(torch.ones(3))], max_grad_norm=1.0)


def test_max_grad_norm_keeps_the_checkpoint_layout():
    p = torch.nn.Parameter(torch.randn(4))
    ours = fused_optim.AdamW([p], max_grad_norm=1.0)
    torch_opt = torch.optim.AdamW([torch.nn.Parameter(torch.randn(4))])
    p.grad = torch.randn(4)
    ours.step()
    assert set(ours.state_dict()["param_groups"][0]) == set(torch_opt.state_dict()["param_groups"][0]) | {"fused"}
    assert "max_grad_norm" in str(type(ours).__init__.__signature__)


def test_mixed_dtypes_share_one_global_norm(reductions):
    """fp32, bf16 and fp16 grads in two groups: one norm over all of them (fp32 accumulation), as the reference."""
    shapes_dtypes = [((33, 5), torch.float32), ((257,), torch.bfloat16), ((4, 3, 3, 3), torch.float16),
                     ((), torch.float32)]
    runs = []
    for fused in (True, False):
        params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)).add_(0.1)
                                     .to(DEVICE, dt)) for i, (s, dt) in enumerate(shapes_dtypes)]
        opt = fused_optim.SGD([{"params": params[:2]}, {"params": params[2:]}], lr=0.1, momentum=0.9, fused=fused,
                              max_grad_norm=1.5)
        norms = []
        for step in range(5):
            g = torch.Generator().manual_seed(100 + step)
            for p in params:
                p.grad = (2.0 * torch.randn(p.shape, generator=g)).to(DEVICE, p.dtype)
            exact = torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in params])).item()
            opt.step()
            norms.append(float(opt.last_grad_norm))
        runs.append((params, norms, exact))
    (pf, nf, exact), (pr, nr, _) = runs
    assert min(nr) > 1.5  # clipped every step
    # clip_grad_norm_ rounds each bf16/fp16 tensor's norm to its dtype before the total; the fused path keeps fp32
    # throughout: the totals agree to that rounding (2^-8 relative), not to fp32's
    torch.testing.assert_close(torch.tensor(nf), torch.tensor(nr), rtol=2.0 ** -8, atol=0)
    assert abs(nf[-1] - exact) <= 1e-5 * exact  # and the fused norm is fp32-accurate
    for i, (a, b) in enumerate(zip(pf, pr)):
        start = torch.randn(shapes_dtypes[i][0], generator=torch.Generator().manual_seed(i)).add_(0.1).to(DEVICE)
        moved = (b.float() - start.to(b.dtype).float()).abs().max().item()
        assert moved > 1e-3
        # the clip coefficients differ by the reference's rounding of the norm (above): so may the displacements;
        # low-precision params also round to their dtype
        atol = 2.0 ** -8 * moved + {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[a.dtype]
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=atol)
