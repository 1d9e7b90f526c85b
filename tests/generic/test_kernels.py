"""Every fused (Triton) path against the reference path. On CPU the kernels run under TRITON_INTERPRET=1."""
import pytest
import torch

from cases import MATRIX, MATRIX_IDS, clone_params, make_params, param_groups, run
from conftest import DEVICE
from helpers import assert_states_close, assert_unchanged, snapshot, step_twins
from fused_optim.kernels import multi_tensor as mt
from fused_optim.kernels import runtime

KERNEL_MATRIX = [(c, cfg) for c, cfg in MATRIX if c.kernel]
KERNEL_IDS = [i for (c, _), i in zip(MATRIX, MATRIX_IDS) if c.kernel]
# the tests below that set dense grads themselves skip cases whose grads only the driver can make (sparse)
DENSE_MATRIX = [m for m in KERNEL_MATRIX if m[0].dense_grads]
DENSE_IDS = [i for m, i in zip(KERNEL_MATRIX, KERNEL_IDS) if m[0].dense_grads]


def _pair(case, config, dtype=torch.float32, ref_dtype=None, device=DEVICE):
    a1, a2 = make_params(case, dtype, device)
    b1, b2 = (clone_params(a1), clone_params(a2)) if ref_dtype is None else (
        [p.to(ref_dtype) for p in a1], [p.to(ref_dtype) for p in a2])
    fused = case.cls(param_groups(case, config, a1, a2), fused=True, **config)
    ref = case.cls(param_groups(case, config, b1, b2), fused=False, **config)
    return fused, a1 + a2, ref, b1 + b2


@pytest.mark.parametrize("case,config", KERNEL_MATRIX, ids=KERNEL_IDS)
def test_kernel_matches_reference_fp32(case, config):
    fused, pa, ref, pb = _pair(case, config)
    n0 = runtime.launch_count
    run(case, [fused, ref], [pa, pb])
    assert_states_close(fused, pa, ref, pb, rtol=case.kernel_rtol, atol=case.kernel_atol)
    # case.launches per param group per step, independent of the tensor count (SGD's first momentum step may add one)
    assert runtime.launch_count - n0 <= len(fused.param_groups) * (case.steps * case.launches + 1)


# low precision changes only the loads and stores, not the option code: the first and last (most options)
# configuration of each optimizer
_LOWP = [i for i, (c, cfg) in enumerate(KERNEL_MATRIX) if cfg is c.configs[0] or cfg is c.configs[-1]]


@pytest.mark.parametrize("case,config", [KERNEL_MATRIX[i] for i in _LOWP], ids=[KERNEL_IDS[i] for i in _LOWP])
@pytest.mark.parametrize("dtype,bound", [(torch.bfloat16, 0.05), (torch.float16, 0.01)], ids=["bf16", "fp16"])
def test_kernel_low_precision(case, config, dtype, bound):
    """bf16/fp16 params, grads and states, against an fp32 run from the same start.

    The kernel does fp32 math and rounds once per step; the reference path rounds after every op. Each drifts
    from the fp32 trajectory by accumulated roundings (bf16: 2^-9 relative each, amplified by momentum), so the
    claim tested is: the kernel's relative error over 10 steps is below `bound` (5% bf16, 1% fp16) and no worse
    than 1.25x the reference path's own low-precision error (or below 1e-3)."""
    fused, pa, ref, pb = _pair(case, config, dtype)
    exact = case.cls(param_groups(case, config, *[[p.float() for p in ps] for ps in make_params(case, dtype)]),
                     fused=False, **config)
    pe = [p for g in exact.param_groups for p in g["params"]]
    run(case, [fused, ref, exact], [pa, pb, pe], steps=10)

    def rel_err(ps):
        num = sum(((a.float().cpu() - e.cpu()) ** 2).sum() for a, e in zip(ps, pe))
        return float(num.sqrt() / sum((e.cpu() ** 2).sum() for e in pe).sqrt())

    err_fused, err_ref = rel_err(pa), rel_err(pb)
    assert err_fused < bound, (err_fused, err_ref)
    # (the reference path can overflow to NaN in fp16 where fp32 math does not: then only 1e-3 counts)
    assert err_fused <= 1e-3 or err_fused <= 1.25 * err_ref, (err_fused, err_ref)


@pytest.mark.parametrize("case,config", DENSE_MATRIX[:1] + [m for m in DENSE_MATRIX if m[0].name == "Adam"][:1],
                         ids=lambda x: getattr(x, "name", None) or str(x))
def test_steady_state_uploads_nothing(case, config):
    fused, pa, _, _ = _pair(case, config)
    run(case, [fused], [pa], steps=2)
    builds = sum(c.builds for c in fused._kernel_caches.values())
    n0 = runtime.launch_count
    # keep grads at the same addresses: copy into them
    grads = [p.grad for p in pa]
    for _ in range(3):
        for g in grads:
            g.copy_(torch.randn_like(g))
        fused.step()
    assert sum(c.builds for c in fused._kernel_caches.values()) == builds
    assert runtime.launch_count - n0 == 3 * len(fused.param_groups)


@pytest.mark.parametrize("case,config", DENSE_MATRIX, ids=DENSE_IDS)
def test_found_inf_changes_nothing(case, config):
    fused, pa, _, _ = _pair(case, config)
    run(case, [fused], [pa], steps=2)
    for p in pa:
        p.grad = torch.randn_like(p)
    snap = snapshot(fused, pa)
    grads = [p.grad.clone() for p in pa]
    fused.step(grad_scale=torch.tensor(4.0, device=DEVICE), found_inf=torch.tensor(1.0, device=DEVICE))
    assert_unchanged(fused, pa, snap)
    assert all(torch.equal(p.grad, g) for p, g in zip(pa, grads))


@pytest.mark.parametrize("case,config", DENSE_MATRIX, ids=DENSE_IDS)
def test_grad_scale_unscales_in_kernel(case, config):
    """A step on grads scaled by S with grad_scale=S equals the unscaled step, and p.grad ends unscaled."""
    fused, pa, ref, pb = _pair(case, config)
    for _ in range(3):
        for p, q in zip(pa, pb):
            g = torch.randn_like(q)
            p.grad, q.grad = g * 1024.0, g.clone()
        fused.step(grad_scale=torch.tensor(1024.0, device=DEVICE), found_inf=torch.tensor(0.0, device=DEVICE))
        ref.step()
        for p, q in zip(pa, pb):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
    assert_states_close(fused, pa, ref, pb, rtol=case.kernel_rtol, atol=case.kernel_atol)


def test_unaligned_views_use_unhinted_variant():
    """tl.multiple_of(ptr, 16) is a promise: a view at an odd offset must go to the variant without the hint."""
    import fused_optim
    base = torch.randn(1 + 3000, device=DEVICE)
    p = base[1:].view(100, 30)  # 4-byte offset: not 16-byte aligned
    q = p.detach().clone()
    before = base[0].clone()
    a = fused_optim.Adam([p], lr=0.01, fused=True)
    b = fused_optim.Adam([q], lr=0.01, fused=False)
    for _ in range(3):
        step_twins(a, [p], b, [q])
    tables = [t for c in a._kernel_caches.values() for t in c.tables.values()]
    assert tables and not any(t.aligned for t in tables)
    torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert torch.equal(base[0], before)  # no store before the view's first element


def test_fused_true_refuses_cpu_without_interpreter(monkeypatch):
    import fused_optim
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="fused=True needs CUDA"):
        fused_optim.Adam([torch.randn(3, requires_grad=True)], fused=True)


@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_swapped_param_data_and_replaced_state_are_picked_up(name):
    """A param whose .data is swapped for another tensor between steps (FSDP1, some weight tying) and a state tensor
    replaced in the state dict must be what the next fused step updates: the table cache never trusts an address
    it has not checked this step."""
    import fused_optim
    kw = {"lr": 0.05, **({"momentum": 0.9} if name == "SGD" else {})}
    torch.manual_seed(0)
    pa = [torch.nn.Parameter(torch.randn(33, 7, device=DEVICE)) for _ in range(3)]
    pb = [torch.nn.Parameter(p.detach().clone()) for p in pa]
    fused = getattr(fused_optim, name)(pa, fused=True, **kw)
    ref = getattr(fused_optim, name)(pb, fused=False, **kw)
    key = "exp_avg" if name == "Adam" else "momentum_buffer"
    for step in range(6):
        if step == 2:  # new storage for param 1's data, same values and shape
            for p in (pa[1], pb[1]):
                p.data = p.data.clone() * 1.5
        if step == 4:  # a state tensor replaced by a copy (e.g. moved or re-cast by user code)
            for opt, p in ((fused, pa[2]), (ref, pb[2])):
                opt.state[p][key] = opt.state[p][key].clone() * 0.5
        step_twins(fused, pa, ref, pb)
        for p, q in zip(pa, pb):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for p, q in zip(pa, pb):
        torch.testing.assert_close(fused.state[p][key], ref.state[q][key], rtol=1e-5, atol=1e-6)


def test_grad_dtype_change_between_steps_is_picked_up():
    """A grad that changes dtype between steps (``p.grad.data = ...``, or torch's ``grad_dtype=None``) lands in
    another dtype bucket: the next fused step must read it as what it is now, not as the dtype its tables were
    built for (its new address alone would only re-upload the grad column)."""
    import fused_optim
    torch.manual_seed(0)
    pa = [torch.nn.Parameter(torch.randn(n, device=DEVICE)) for n in (300, 5)]
    pb = [torch.nn.Parameter(p.detach().clone()) for p in pa]
    fused = fused_optim.Adam(pa, lr=0.05, fused=True)
    ref = fused_optim.Adam(pb, lr=0.05, fused=False)
    for step in range(4):
        for p, q in zip(pa, pb):
            g = torch.randn(p.shape, device=DEVICE)
            p.grad, q.grad = g.clone(), g.clone()
        if step >= 2:  # the first param's grad in bf16 from step 2 on (the reference gets its exact fp32 values)
            g = pa[0].grad.bfloat16()
            pa[0].grad.data, pb[0].grad = g, g.float()
        fused.step()
        ref.step()
        assert pa[0].grad.dtype == (torch.bfloat16 if step >= 2 else torch.float32)
        for p, q in zip(pa, pb):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"step {step}")
