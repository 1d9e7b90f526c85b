"""float64 params: the fused path computes in float64 (torch's kernels compute in double for double tensors), so it
matches the float64 reference to rounding, not to float32's 1e-7. On CPU the kernels run under the interpreter.

The bound: rel 1e-12, atol 1e-14 (entries that pass through 0, e.g. a momentum buffer after cancelling grads, are
compared on the absolute scale of a few float64 roundings of O(1) values, 2^-52 ~ 2e-16, over 20 steps). fp32 math
misses it by 10^5 (float32 rounding is 6e-8). Families whose kernels are fp32 only (``float64_in_kernel = False``)
must run float64 params on the reference path: no launch."""
import copy

import pytest
import torch

import fused_optim
from cases import MATRIX, MATRIX_IDS, clone_params, make_params, param_groups, run
from conftest import DEVICE
from helpers import assert_close, assert_states_close
from fused_optim.kernels import runtime

RTOL, ATOL = 1e-12, 1e-14

KERNEL = [(i, c, cfg) for i, (c, cfg) in zip(MATRIX_IDS, MATRIX) if c.kernel]


def _small(case):
    """Fewer shapes than the case's (its first, a 0-d one, the first of the second group): a short interpreter run
    that still spans several programs and a masked tail."""
    c = copy.copy(case)
    c.shapes, c.shapes2 = case.shapes[:1] + [s for s in case.shapes if s == ()][:1], case.shapes2[:1]
    return c


def _pair(case, config, **kw):
    a1, a2 = make_params(case, torch.float64, DEVICE)
    b1, b2 = clone_params(a1), clone_params(a2)
    fused = case.cls(param_groups(case, config, a1, a2), fused=True, **config, **kw)
    ref = case.cls(param_groups(case, config, b1, b2), fused=False, **config, **kw)
    return fused, a1 + a2, ref, b1 + b2


@pytest.fixture
def default_float64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


@pytest.mark.parametrize("case,config", [(c, cfg) for _, c, cfg in KERNEL], ids=[i for i, _, _ in KERNEL])
def test_fused_float64_matches_reference(case, config, request):
    # NvNovoGrad keeps its 0-d moments in the default dtype (timm). With float32 moments the reference takes their
    # square root in float32, which torch's CPU kernel does not round correctly (1 ulp off for ~15% of inputs; CUDA's
    # is IEEE, as the kernel's): float64 moments here, float32 ones in test_float64_with_float32_moments
    if case.name == "NvNovoGrad":
        request.getfixturevalue("default_float64")
    case = _small(case)
    fused, pa, ref, pb = _pair(case, config)
    start = [p.detach().clone() for p in pb]
    n0 = runtime.launch_count
    run(case, [fused, ref], [pa, pb])
    if case.cls.float64_in_kernel:
        assert runtime.launch_count > n0, "the fused path launched nothing"
    else:
        assert runtime.launch_count == n0, "float64 params of an fp32-only family must take the reference path"
    assert all(p.dtype == torch.float64 for p in pa)
    assert any(not torch.equal(p, s) for p, s in zip(pb, start)), "the reference did not move the params"
    # a reference whose own math is low precision whatever the params' dtype (Muon's bf16 Newton-Schulz, as
    # torch's) keeps its case's bounds; everything else agrees to float64 rounding
    rtol, atol = (case.kernel_rtol, case.kernel_atol) if case.kernel_atol > 1e-6 else (RTOL, ATOL)
    assert_states_close(fused, pa, ref, pb, rtol=rtol, atol=atol)


CKPT = [(c, c.configs[-1]) for c in {c.name: c for _, c, _ in KERNEL}.values() if c.name in ("NAdam", "ASGD")]


@pytest.mark.parametrize("case,config", CKPT, ids=[c.name for c, _ in CKPT])
def test_fused_float64_after_checkpoint_load(case, config):
    """torch's load_state_dict makes the 0-d states but ``step`` float64 for float64 params (NAdam's mu_product,
    ASGD's eta and mu), and its math then runs in their dtype: the fused path keeps and computes them so."""
    case = _small(case)
    fused, pa, ref, pb = _pair(case, config)
    run(case, [fused, ref], [pa, pb], steps=3)
    sd = ref.state_dict()
    fused.load_state_dict(copy.deepcopy(sd))  # copies: torch's load keeps some state tensors as they are
    ref.load_state_dict(copy.deepcopy(sd))
    for p in pa:
        for k, v in fused.state[p].items():
            if k != "step" and v.dim() == 0:
                assert v.dtype == torch.float64, k
    run(case, [fused, ref], [pa, pb], steps=10, seed=2)
    for p, q in zip(pa, pb):  # the dtypes too: the fused path keeps torch's
        assert {k: v.dtype for k, v in fused.state[p].items()} == {k: v.dtype for k, v in ref.state[q].items()}
    assert_states_close(fused, pa, ref, pb, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["Adam", "RMSprop"])
def test_fused_float64_clipping(name):
    """max_grad_norm on float64 grads: the norm and the clip coefficient in float64, like clip_grad_norm_."""
    case = _small(next(c for _, c, _ in KERNEL if c.name == name))
    fused, pa, ref, pb = _pair(case, {}, max_grad_norm=0.5)  # random grads of norm ~3: every step clips
    gen, n0 = torch.Generator().manual_seed(1), runtime.launch_count
    for _ in range(10):
        for p, q in zip(pa, pb):  # separate grads: both steps clip p.grad in place
            q.grad = torch.randn(q.shape, generator=gen, dtype=torch.float64).to(DEVICE)
            p.grad = q.grad.clone()
        fused.step()
        ref.step()
        torch.testing.assert_close(fused.last_grad_norm.cpu(), ref.last_grad_norm.cpu(), rtol=RTOL, atol=0)
        assert float(ref.last_grad_norm) > 0.5
        assert_close([p.grad for p in pa], [q.grad for q in pb], RTOL, ATOL, "clipped grads")
    assert runtime.launch_count > n0
    assert fused.last_grad_norm.dtype == torch.float64
    assert_states_close(fused, pa, ref, pb, rtol=RTOL, atol=ATOL)


def test_float64_with_float32_moments():
    """NvNovoGrad's default-dtype (float32) 0-d moments of float64 params: the kernel rounds every op on them to
    float32 as the reference does (v * beta2, the blend, sqrt, + eps; the moment itself exactly). The reference's
    CPU float32 sqrt may be 1 ulp off (see above), so the params agree to that: rel 2^-22 of the update."""
    case = _small(next(c for _, c, _ in KERNEL if c.name == "NvNovoGrad"))
    fused, pa, ref, pb = _pair(case, {})
    run(case, [fused, ref], [pa, pb], steps=5)
    for p, q in zip(pa, pb):
        assert fused.state[p]["exp_avg_sq"].dtype == torch.float32
        torch.testing.assert_close(fused.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"], rtol=0, atol=0)
    assert_states_close(fused, pa, ref, pb, rtol=1e-6, atol=1e-9)
