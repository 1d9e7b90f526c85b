"""state_dtype="int8": blockwise 8-bit states (fused_optim/kernels/quant.py) on both paths, in the same launch per
group and dtype bucket; the quantizer's two halves bit for bit; checkpoints both ways; bad input."""
import pytest
import torch

import fused_optim
from cases import ALL, run
from cases.projection import MODES
from conftest import DEVICE
from helpers import launches, saved, step_twins
from fused_optim.kernels import multi_tensor as mt
from fused_optim.kernels import quant, runtime
from fused_optim.kernels.lean import join_remainder
from fused_optim.kernels.tables import TableCache

INT8 = "int8"
MIN = 256  # int8_min_numel in the kernel tests: small tensors, several programs, partial blocks
SHAPES = [(256 + 37,), (3, 255), (100,), (), (0,)]  # quantized x2 (odd sizes: partial blocks), fp32 x3
PATHS = pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])


def _params(shapes=SHAPES, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype).to(DEVICE)) for s in shapes]


def _grads(params, gen):
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype).to(DEVICE)


# ---- the code maps and the reference quantizer -----------------------------------------------------------------------
def _rel_error_bound(qmap, lo):
    """The largest relative error of nearest-code rounding for |x| / absmax in [lo, 1]: half the gap above a map
    value over that value, for the gaps whose lower end is >= lo (and the gap reaching down into lo)."""
    m = qmap.double()
    m = m[m >= 0]
    gaps = m.diff()
    first = int((m < lo).sum()) - 1  # the gap holding lo
    return max((gaps[i] / 2 / max(m[i], lo)).item() for i in range(first, len(gaps)))


@pytest.mark.parametrize("unsigned", [False, True], ids=["signed", "unsigned"])
def test_code_maps_round_trip_and_error_bound(unsigned):
    qmap = quant.map_of(unsigned)
    assert qmap.dtype == torch.float32 and qmap.numel() == 256 and bool((qmap.diff() > 0).all())
    assert 0.0 in qmap and 1.0 in qmap and (unsigned or -1.0 in qmap)
    # map values (times the block's absmax) come back exactly, in every block
    vals = qmap[torch.randperm(256, generator=torch.Generator().manual_seed(0))].repeat(3) * 3.5
    vals[255] = vals[511] = vals[767] = 3.5  # each block's absmax element
    codes, absmax = quant.quantize(vals, unsigned)
    assert torch.equal(absmax, torch.full((3,), 3.5))
    assert torch.equal(quant.dequantize(codes, absmax, unsigned), vals)
    # an all-zero block: scale 0, decodes to 0; a partial last block
    codes, absmax = quant.quantize(torch.zeros(300), unsigned)
    assert absmax.tolist() == [0.0, 0.0] and torch.equal(quant.dequantize(codes, absmax, unsigned), torch.zeros(300))
    # random data: the stated bounds (7.1% / 3.6% for elements >= 10% of their block's absmax, 14.1% / 7.1% for
    # >= 1%), and every block's absmax element exact
    bounds = {0.1: 0.0711 if not unsigned else 0.0357, 0.01: 0.141 if not unsigned else 0.0711}
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64 * 256 + 77, generator=gen) * torch.rand(64 * 256 + 77, generator=gen).pow(4)
    x = x.abs() if unsigned else x
    codes, absmax = quant.quantize(x, unsigned)
    y = quant.dequantize(codes, absmax, unsigned)
    scale = absmax.repeat_interleave(256)[:x.numel()]
    for lo, stated in bounds.items():
        bound = _rel_error_bound(qmap, lo)
        assert bound <= stated
        big = x.abs() >= lo * scale
        assert ((y - x).abs()[big] <= bound * x.abs()[big] * (1 + 1e-6)).all()
    top = x.abs() == scale
    assert torch.equal(y[top], x[top]) and int(top.sum()) == absmax.numel()
    half_gap = qmap.double().diff().max().item() / 2  # every element: within half the widest gap (0.7% of absmax)
    assert half_gap < 0.0071 and ((y - x).abs() <= scale * half_gap * (1 + 1e-6)).all()


if runtime.available():
    import triton
    import triton.language as tl

    @triton.jit
    def _copy_update(p, g, s0, s1, s2, s3, c0, c1, c2, c3, lr, h1, h2, h3, h4, h5, h6, h7, FLAGS: tl.constexpr):
        # s0 := the grad (so its codes must be the reference quantizer's), s1 requantized as loaded
        return p, g * 0.5, s1, s2, s3


def test_kernel_quantizer_is_bit_identical_to_reference():
    gen = torch.Generator().manual_seed(0)
    n = [2 * 256 + 37, 256 * 5 + 255, 256, 7]
    params = [torch.randn(k, generator=gen).to(DEVICE) for k in n]
    grads = [torch.randn(k, generator=gen).to(DEVICE) * torch.rand(k, generator=gen).to(DEVICE) ** 3 for k in n]
    grads[2][:] = 0  # an all-zero block
    grads[1][256:512] = 1e-30  # a block of tiny values
    first = [quant.quantize(torch.randn(k, generator=gen), False) for k in n]
    second = [quant.quantize(torch.rand(k, generator=gen) ** 4, True) for k in n]
    cols = [[c.to(DEVICE).clone() for c, _ in first], [c.to(DEVICE).clone() for c, _ in second]]
    scales = [[s.to(DEVICE).clone() for _, s in first], [s.to(DEVICE).clone() for _, s in second]]
    rule = mt.Rule(_copy_update, hypers=dict(lr=0.0))
    assert launches(lambda: mt.apply(rule, TableCache(), params, grads, cols, [], scales=scales, unsigned=0b10))[0] == 1
    for i, g in enumerate(grads):
        codes, absmax = quant.quantize((g * 0.5).cpu(), False)
        assert torch.equal(cols[0][i].cpu(), codes) and torch.equal(scales[0][i].cpu(), absmax)
        # dequantize -> requantize reproduces the codes and scales
        assert torch.equal(cols[1][i].cpu(), second[i][0]) and torch.equal(scales[1][i].cpu(), second[i][1])


# ---- optimizers: fused vs reference ----------------------------------------------------------------------------------
FAMILIES = {
    "Adam": lambda ps, **kw: fused_optim.Adam(ps, lr=1e-2, **kw),
    "AdamW-amsgrad": lambda ps, **kw: fused_optim.AdamW(ps, lr=1e-2, amsgrad=True, **kw),
    "SGD-momentum": lambda ps, **kw: fused_optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True, **kw),
    "RMSprop-centered": lambda ps, **kw: fused_optim.RMSprop(ps, lr=1e-3, centered=True, momentum=0.5, **kw),
    "Adagrad": lambda ps, **kw: fused_optim.Adagrad(ps, lr=1e-2, initial_accumulator_value=0.1, **kw),
    "Lion": lambda ps, **kw: fused_optim.Lion(ps, lr=1e-3, weight_decay=0.1, **kw),
    # layer-wise norms, then the shared apply (its int8 states are the same slots)
    "NvNovoGrad": lambda ps, **kw: fused_optim.NvNovoGrad(ps, lr=1e-2, weight_decay=0.01, **kw),
    "Lars-momentum": lambda ps, **kw: fused_optim.Lars(ps, lr=0.1, momentum=0.9, weight_decay=1e-4, **kw),
    # its own kernel: trust-ratio statistics on the dequantized moments, then the apply (whole 256-blocks per
    # iteration), after timm's global clip
    "Lamb": lambda ps, **kw: fused_optim.Lamb(ps, lr=1e-2, **kw),
    "Lamb-caution-decoupled": lambda ps, **kw: fused_optim.Lamb(ps, lr=1e-2, weight_decay=0.1, caution=True,
                                                                decoupled_decay=True, **kw),
}


@pytest.mark.parametrize("name", FAMILIES)
def test_int8_fused_matches_reference(name):
    """20 steps on both paths. Both quantize bit-identically (above); their fp32 math differs by a rounding (FMA,
    operation order), which moves a scale by an ulp and can move a value across a decision threshold: codes then
    differ by 1 (measured: none in most runs). Asserted: scales within 1e-5, at most 0.2% of codes off, by 1, and
    params within the effect of such a code (1e-4 of the update scale)."""
    make = FAMILIES[name]
    pa, pb = _params(), _params()
    fused = make(pa, fused=True, state_dtype=INT8, int8_min_numel=MIN)
    ref = make(pb, fused=False, state_dtype=INT8, int8_min_numel=MIN)
    step_twins(fused, pa, ref, pb, torch.Generator().manual_seed(1), steps=20)
    for p, q in zip(pa, pb):
        _assert_int8_states_close(p, fused.state[p], ref.state[q])
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-4)


def _assert_int8_states_close(p, sa, sb):
    """Two paths' states of param p: the same keys; int8 codes (large params only, with their scales) off by at most
    1 on at most 0.2% of elements; scales and fp32 states (small params) within 1e-5."""
    assert sa.keys() == sb.keys()
    for k, v in sb.items():
        if isinstance(v, torch.Tensor) and v.dtype == torch.uint8:
            assert p.numel() >= MIN and k + "_absmax" in sb
            off = (sa[k].int() - v.int()).abs()
            assert off.max() <= 1 and off.float().mean() <= 2e-3, f"{k}: {int((off > 0).sum())} codes differ"
        elif quant.is_scale_key(k) or (isinstance(v, torch.Tensor) and v.is_floating_point() and v.shape == p.shape):
            assert v.dtype == torch.float32 and (quant.is_scale_key(k) or p.numel() < MIN)
            torch.testing.assert_close(sa[k], v, rtol=1e-5, atol=1e-7)


@PATHS
def test_int8_layout_launches_and_training_progress(fused):
    """Large tensors get uint8 codes and one fp32 scale per 256 elements; small ones fp32 states; one launch per
    dtype bucket (int8, fp32); the quantized Adam still fits: a least-squares loss falls like fp32 states'."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(64, 16, generator=gen).to(DEVICE)
    b = a @ torch.randn(16, 20, generator=gen).to(DEVICE)
    losses = {}
    for sd in (None, INT8):
        w = torch.nn.Parameter(torch.zeros(16, 20, device=DEVICE))
        bias = torch.nn.Parameter(torch.zeros(20, device=DEVICE))
        opt = fused_optim.AdamW([w, bias], lr=3e-2, fused=fused, state_dtype=sd, int8_min_numel=MIN)
        for i in range(25):
            opt.zero_grad()
            loss = ((a @ w + bias - b) ** 2).mean()
            loss.backward()
            n = launches(opt.step)[0]
            assert n == (0 if not fused else 2 if sd else 1)
        losses[sd] = loss.item()
        if sd:
            st, sb = opt.state[w], opt.state[bias]
            assert st["exp_avg"].dtype == torch.uint8 and st["exp_avg"].shape == w.shape
            assert st["exp_avg_sq_absmax"].shape == (2,) and st["exp_avg_sq_absmax"].dtype == torch.float32
            assert sb["exp_avg"].dtype == torch.float32 and "exp_avg_absmax" not in sb
    assert losses[INT8] < 0.5 * (b ** 2).mean().item()
    assert abs(losses[INT8] - losses[None]) < 0.1 * losses[None] + 0.05


def test_int8_with_param_remainders_fused_matches_reference():
    """bf16 params with int16 remainders (the exact fp32 master) and int8 states, in the same launch."""
    pa, pb = _params(SHAPES[:1] + SHAPES[2:3], dtype=torch.bfloat16), _params(SHAPES[:1] + SHAPES[2:3],
                                                                              dtype=torch.bfloat16)
    kw = dict(lr=1e-2, state_dtype=INT8, int8_min_numel=MIN, param_remainders=True)
    fused, ref = fused_optim.AdamW(pa, fused=True, **kw), fused_optim.AdamW(pb, fused=False, **kw)
    step_twins(fused, pa, ref, pb, torch.Generator().manual_seed(1), steps=5)
    for p, q in zip(pa, pb):
        sa, sb = fused.state[p], ref.state[q]
        assert sa["param_remainder"].dtype == torch.int16
        assert sa["exp_avg"].dtype == (torch.uint8 if p.numel() >= MIN else torch.float32)
        ma = join_remainder(p.detach(), sa["param_remainder"])
        torch.testing.assert_close(ma, join_remainder(q.detach(), sb["param_remainder"]), rtol=1e-5, atol=1e-5)
        if p.numel() >= MIN:
            assert (sa["exp_avg"].int() - sb["exp_avg"].int()).abs().max() <= 1


# SGDP / AdamP: their own kernels (per-row statistics on the dequantized states, then the apply, which walks the int8
# states in whole 256-element blocks): 3 x 255 and 10 x 30 rows straddle blocks; the small tensors keep fp32 states
PROJECTED = {"SGDP": dict(lr=0.1, momentum=0.9, weight_decay=0.1),
             "AdamP-nesterov-caution": dict(lr=1e-2, weight_decay=0.1, nesterov=True, caution=True)}


@pytest.mark.parametrize("name", PROJECTED)
def test_int8_projected_fused_matches_reference(name):
    """As test_int8_fused_matches_reference, with grads that make the weights project per channel and per layer
    (cases/projection.py's driver); AdamP on bf16 params with remainders (its masters compared). Launches: two dtype
    buckets (int8 codes, the small tensors' fp32 states), 2 each; the C++ engine reads neither codes nor remainders,
    so the int8 bucket's statistics are Triton's pass."""
    case = {c.name: c for c in ALL}[name.split("-")[0]]
    remainders = name.startswith("AdamP")
    shapes = [(3, 255), (10, 6, 5), (256 + 37,), (5, 3), (), (0,)]
    pa, pb = (_params(shapes, dtype=torch.bfloat16 if remainders else torch.float32) for _ in range(2))
    kw = dict(PROJECTED[name], state_dtype=INT8, int8_min_numel=MIN, param_remainders=remainders)
    fused, ref = case.cls(pa, fused=True, **kw), case.cls(pb, fused=False, **kw)
    MODES.clear()
    n = launches(lambda: run(case, [fused, ref], [pa, pb], steps=20))
    assert n == (20 * 4, 0 if remainders else 20), n
    assert {(2, 1), (2, 2), (3, 1), (3, 2)} <= set(MODES), MODES
    for p, q in zip(pa, pb):
        sa, sb = fused.state[p], ref.state[q]
        _assert_int8_states_close(p, sa, sb)
        if remainders:
            ma = join_remainder(p.detach(), sa["param_remainder"])
            torch.testing.assert_close(ma, join_remainder(q.detach(), sb["param_remainder"]), rtol=1e-5, atol=1e-4)
        else:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-4)


def test_int8_lamb_with_remainders_fused_matches_reference():
    """Lamb on bf16 params with remainders and int8 moments (trust ratio and caution): the masters within float32
    rounding of the update, the codes as test_int8_fused_matches_reference; launches: 1 per dtype bucket (int8 codes,
    the small tensors' fp32 moments), as without the options."""
    pa, pb = _params(dtype=torch.bfloat16), _params(dtype=torch.bfloat16)
    # no global clip here: timm's (the reference's) rounds the norm of bf16 grads to bf16, the fused one's is fp32
    kw = dict(lr=1e-2, weight_decay=0.1, caution=True, max_grad_norm=None, state_dtype=INT8, int8_min_numel=MIN,
              param_remainders=True)
    fused, ref = fused_optim.Lamb(pa, fused=True, **kw), fused_optim.Lamb(pb, fused=False, **kw)
    assert launches(lambda: step_twins(fused, pa, ref, pb, torch.Generator().manual_seed(1), steps=20)) == (20 * 2, 0)
    for p, q in zip(pa, pb):
        sa, sb = fused.state[p], ref.state[q]
        assert sa["exp_avg"].dtype == (torch.uint8 if p.numel() >= MIN else torch.float32)
        _assert_int8_states_close(p, sa, sb)
        ma = join_remainder(p.detach(), sa["param_remainder"])
        torch.testing.assert_close(ma, join_remainder(q.detach(), sb["param_remainder"]), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name,kw", [("AdamW", {}), ("SGD", dict(momentum=0.9)), ("Lamb", {})])
def test_int8_states_of_a_strided_slice_param(name, kw):
    """A strided-slice param is copied to a layout the kernels walk: its states' (created dense in the param's
    stride order), so the int8 codes stay in place with their blocks' scales (a contiguous copy relaid the codes
    and paired them with other blocks' scales: 1.5e-3 .. 3.7e-3 away from the reference in 5 steps)."""
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(60, 40, generator=gen).to(DEVICE)
    pa, pb = (torch.nn.Parameter(full.clone().t()[:, ::2]) for _ in range(2))
    assert not pa.is_contiguous() and pa.numel() >= MIN
    fused, ref = (getattr(fused_optim, name)([p], lr=1e-2, fused=f, state_dtype=INT8, int8_min_numel=MIN, **kw)
                  for p, f in ((pa, True), (pb, False)))
    assert launches(lambda: step_twins(fused, [pa], ref, [pb], torch.Generator().manual_seed(1), steps=5))[0] > 0
    assert fused.state[pa]["exp_avg" if name != "SGD" else "momentum_buffer"].dtype == torch.uint8
    torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


# ---- checkpoints --------------------------------------------------------------------------------------------------
@PATHS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_int8_checkpoint_round_trip_is_bit_exact(fused, dtype):
    make = lambda ps: fused_optim.SGD(ps, lr=1e-2, momentum=0.9, fused=fused, state_dtype=INT8, int8_min_numel=MIN)
    pa = _params(SHAPES[:3], dtype=dtype)
    opt = make(pa)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        _grads(pa, gen)
        opt.step()
    pb = [torch.nn.Parameter(p.detach().clone()) for p in pa]
    again = make(pb)
    again.load_state_dict(saved(opt.state_dict()))
    assert again.state[pb[0]]["momentum_buffer_absmax"].dtype == torch.float32  # not cast to the bf16 param's
    step_twins(opt, pa, again, pb, gen, steps=2)
    for p, q in zip(pa, pb):
        assert torch.equal(p, q)
        assert opt.state[p].keys() == again.state[q].keys()
        assert all(torch.equal(v, again.state[q][k]) for k, v in opt.state[p].items())


def test_int8_checkpoint_with_other_strides_is_relaid():
    """Codes saved in another storage order than their param (a checkpoint from a transposed layout): blocks follow
    the storage order, so loading relays the values and requantizes them in the param's order; the fused step then
    equals the reference step (without the relayout the kernels would pair codes with other elements' values)."""
    pa = _params([(24, 40)])
    opt = fused_optim.Adam(pa, lr=1e-2, state_dtype=INT8, int8_min_numel=MIN)
    gen = torch.Generator().manual_seed(1)
    _grads(pa, gen)
    opt.step()
    sd = saved(opt.state_dict())
    st = sd["state"][0]
    for k, unsigned in (("exp_avg", False), ("exp_avg_sq", True)):  # the same values, column-major codes
        vals = quant.load_state(st, k, unsigned)
        st[k] = torch.empty(vals.shape[::-1], dtype=quant.CODE_DTYPE).t()
        st[k + "_absmax"] = torch.empty_like(st[k + "_absmax"])
        quant.requantize_(st, k, vals, unsigned)
        assert not st[k].is_contiguous()
    twins = []
    for fused in (True, False):
        ps = [torch.nn.Parameter(pa[0].detach().clone())]
        o = fused_optim.Adam(ps, lr=1e-2, fused=fused, state_dtype=INT8, int8_min_numel=MIN)
        o.load_state_dict(saved(sd))
        for k, unsigned in (("exp_avg", False), ("exp_avg_sq", True)):
            assert o.state[ps[0]][k].is_contiguous()
            want = quant.load_state(st, k, unsigned)
            got = quant.load_state(o.state[ps[0]], k, unsigned).cpu()
            assert (got - want).abs().max() <= 0.08 * want.abs().max()  # one more rounding to the map
        twins += [o, ps]
    step_twins(*twins, gen)
    torch.testing.assert_close(twins[1][0], twins[3][0], rtol=1e-5, atol=1e-4)


def test_int8_anchor_state_dict_moves_to_torch_and_back():
    pa = _params(SHAPES[:3])
    lean = fused_optim.AdamW(pa, lr=1e-2, state_dtype=INT8, int8_min_numel=MIN)
    _grads(pa, torch.Generator().manual_seed(1))
    lean.step()
    sd = lean.anchor_state_dict()
    assert not any(quant.is_scale_key(k) for st in sd["state"].values() for k in st)
    assert lean.state[pa[0]]["exp_avg"].dtype == torch.uint8  # the optimizer's own states are untouched
    anchor = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone().cpu()) for p in pa], lr=1e-2)
    anchor.load_state_dict(saved(sd))
    for i, (p, q) in enumerate(zip(pa, anchor.param_groups[0]["params"])):
        for k, unsigned in (("exp_avg", False), ("exp_avg_sq", True)):
            st = lean.state[p]
            want = (quant.dequantize(st[k].flatten(), st[k + "_absmax"], unsigned).view(p.shape) if i < 2 else st[k])
            assert anchor.state[q][k].dtype == torch.float32 and torch.equal(anchor.state[q][k], want.cpu())
    for q in anchor.param_groups[0]["params"]:
        q.grad = torch.randn(q.shape)
    anchor.step()  # fp32 states that the codes do not hold exactly
    back = fused_optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in pa], lr=1e-2, state_dtype=INT8,
                             int8_min_numel=MIN)
    back.load_state_dict(saved(anchor.state_dict()))  # a torch checkpoint: quantized on load
    for i, (q, r) in enumerate(zip(anchor.param_groups[0]["params"], back.param_groups[0]["params"])):
        for k, unsigned in (("exp_avg", False), ("exp_avg_sq", True)):
            if i < 2:
                codes, absmax = quant.quantize(anchor.state[q][k].flatten(), unsigned)
                assert torch.equal(back.state[r][k].flatten().cpu(), codes)
                assert torch.equal(back.state[r][k + "_absmax"].cpu(), absmax)
            else:  # a small tensor's fp32 state loads as is
                assert torch.equal(back.state[r][k].cpu(), anchor.state[q][k])


def test_int8_bad_input():
    f32 = [torch.nn.Parameter(torch.randn(3))]
    for bad in ("int4", "INT8", "uint8"):
        with pytest.raises(ValueError, match="state_dtype"):
            fused_optim.Adam(f32, state_dtype=bad)
    with pytest.raises(ValueError, match="complex"):
        fused_optim.Adam([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))], state_dtype=INT8)
    for bad in (-1, 1.5, True, "4096"):
        with pytest.raises(ValueError, match="int8_min_numel"):
            fused_optim.Adam(f32, state_dtype=INT8, int8_min_numel=bad)
    with pytest.raises(ValueError, match="state_dtype"):
        fused_optim.LBFGS(f32, state_dtype=INT8)
