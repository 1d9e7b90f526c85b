"""Every family on params, grads and states of every layout torch's optimizers take, on both paths: channels_last
and transposed params (grads and states in the param's layout: walked as they are), grads in another layout than
their param, expanded (stride-0) grads, non-dense params (strided slices), and states whose strides differ from
their param's (a checkpoint from another layout). Each run is checked against the reference path on contiguous
copies of the same values, and against the anchor on a channels_last conv model."""
import copy
import dataclasses
import io

import pytest
import torch

from cases import ALL, make_params, param_groups, run
from conftest import DEVICE
from helpers import assert_close, assert_states_close

from fused_optim import FusedOptimizer
from fused_optim._tensors import dense, same_order
from fused_optim.kernels import runtime

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
STEPS = 3


def _fused_ok(case) -> bool:
    """The case's optimizer has a fused path for its driver's grads (sparse Adagrad has none)."""
    return case.cls._has_kernel() and (case.dense_grads or case.name == "SparseAdam")


CASES = [c for c in ALL if not (c.name == "Adagrad" and not c.dense_grads)]
IDS = [c.name for c in CASES]


# ---- layouts, as functions of the contiguous value --------------------------------------------------------------
def _channels_last(x):
    return x.to(memory_format=torch.channels_last) if x.dim() == 4 else x


def _transposed(x):
    return x.t().contiguous().t() if x.dim() == 2 else x


def _sliced(x):
    """x as every other column of a wider tensor: not dense (torch's optimizers accept such a leaf)."""
    if x.dim() == 0 or x.numel() == 0:
        return x
    wide = torch.zeros((*x.shape[:-1], 2 * x.shape[-1]), dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    return wide[..., ::2]


def _like_param(g, p):
    return torch.empty_like(p, dtype=g.dtype).copy_(g)


def _expanded(g, p):
    """g's first row, expanded: every row reads the same memory."""
    return g[:1].expand_as(g) if g.dim() > 0 and g.shape[0] > 1 else g


# one param of each layout (param transform, grad transform; None: as made), in one group, plus a second group
MIXED = [
    ((4, 3, 3, 3), _channels_last, _like_param),  # channels_last conv weight, its grad and states alike
    ((5, 3), _transposed, _like_param),           # transposed: dense, grad and states alike
    ((3, 5), _transposed, None),                  # transposed, the grad contiguous (another layout)
    ((4, 6), _sliced, None),                      # not dense: every other column of a wider tensor
    ((6, 4), None, _expanded),                    # an expanded (stride-0) grad
    ((7,), None, None), ((), None, None), ((0,), None, None),
]
MIXED_2 = [((2, 9), _transposed, _like_param), ((3,), None, None)]
# SparseAdam's embedding-like tables (see cases/sparse_adam.py): a transposed and a sliced one
SPARSE = [((13, 4), _transposed, None), ((4, 6), _sliced, None), ((9,), None, None), ((6, 2, 3), None, None)]


def _layout_case(case):
    """The case on MIXED's params (SparseAdam: SPARSE's), and each param's (param, grad) transforms."""
    slots, slots2 = (SPARSE, [((5,), None, None)]) if case.name == "SparseAdam" else (MIXED, MIXED_2)
    slots = [s for s in slots if s[0] in case.shapes or s[0] != (0,)]  # Adafactor: NaN RMS for empty tensors
    dims = {len(shape) for shape in case.shapes}  # what the case takes (Muon: matrices only)
    slots, slots2 = ([s for s in ss if len(s[0]) in dims] for ss in (slots, slots2))
    case = dataclasses.replace(case, shapes=[s for s, _, _ in slots], shapes2=[s for s, _, _ in slots2])
    return case, [(pf, gf) for _, pf, gf in slots + slots2]


class _Relayout:
    """An optimizer whose step() first gives each dense grad without a graph the layout its param's grad transform
    makes of it (``contiguous``: the same values, contiguous); the driver's other uses pass through."""

    def __init__(self, opt, fns, contiguous=False):
        self._opt, self._fns, self._contiguous = opt, fns, contiguous

    def __getattr__(self, name):
        return getattr(self._opt, name)

    def step(self, *args, **kwargs):
        params = [p for group in self._opt.param_groups for p in group["params"]]
        for p, (_, fn) in zip(params, self._fns):
            if fn is not None and p.grad is not None and not p.grad.is_sparse and p.grad.grad_fn is None:
                g = fn(p.grad, p)
                p.grad = g.contiguous() if self._contiguous else g
        return self._opt.step(*args, **kwargs)


# LBFGS's line search amplifies the rounding of its fused path's dot products (another summation order) past fp32
DTYPE_OF = {"LBFGS": torch.float64}


def _params(case, fns=None):
    """make_params' values, each param made by its transform (fns=None: contiguous)."""
    ps1, ps2 = make_params(case, DTYPE_OF.get(case.name, torch.float32), device=DEVICE)
    n1 = len(ps1)
    out = [torch.nn.Parameter(fns[i][0](p.detach()) if fns and fns[i][0] else p.detach().clone(),
                              requires_grad=case.requires_grad) for i, p in enumerate(ps1 + ps2)]
    return out[:n1], out[n1:]


def _assert_param_layout(opt, params, fns=None):
    """Each tensor state of a dense param's shape is laid out like it, as torch creates them (with ``fns``: the
    params whose grads are laid out like them; torch's SGD clones its first momentum from the grad)."""
    for p in [p for i, p in enumerate(params) if fns is None or fns[i][1] is _like_param]:
        for k, v in opt.state.get(p, {}).items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape and p.numel() > 1 and dense(p):
                assert same_order(v, p), f"state {k!r}: strides {v.stride()} for a param with {p.stride()}"


@pytest.fixture
def copies(monkeypatch):
    """The tensors each fused step copied for its kernels (FusedOptimizer._fit_layouts' write-backs)."""
    seen = []
    fit = FusedOptimizer._fit_layouts

    def counting(self, *args):
        out = fit(self, *args)
        seen.append(len(out[3]))
        return out

    monkeypatch.setattr(FusedOptimizer, "_fit_layouts", counting)
    return seen


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_layout_matches_contiguous_reference(case):
    """Both paths on MIXED's layouts match the reference path on contiguous tensors of the same values, and keep
    each state in its param's layout."""
    case, fns = _layout_case(case)
    config = case.configs[-1]
    base1, base2 = _params(case)
    baseline = _Relayout(case.cls(param_groups(case, config, base1, base2), fused=False, **config), fns, True)
    subjects, lists = [baseline], [base1 + base2]
    for fused in ([False, True] if _fused_ok(case) else [False]):
        ps1, ps2 = _params(case, fns)
        assert all(torch.equal(a, b) for a, b in zip(ps1 + ps2, base1 + base2))
        subjects.append(_Relayout(case.cls(param_groups(case, config, ps1, ps2), fused=fused, **config), fns))
        lists.append(ps1 + ps2)
    run(case, subjects, lists, steps=STEPS)
    for opt, ps in zip(subjects[1:], lists[1:]):
        assert_states_close(opt._opt, ps, baseline._opt, lists[0], rtol=1e-5, atol=1e-6)
        _assert_param_layout(opt._opt, ps, fns)


@pytest.mark.parametrize("name", ["Adam", "SGD", "NovoGrad", "SGDP", "Adafactor"])
def test_dense_layouts_walked_in_place(name, copies):
    """channels_last and transposed params with grads and states alike run with no copy and the launches of
    contiguous ones where the kernels walk storage (element-wise; NovoGrad's norms) or storage rows (SGDP: dim 0
    outermost, as in channels_last); Adafactor reads factored rows and columns: contiguous copies."""
    case = next(c for c in CASES if c.name == name)
    case = dataclasses.replace(case, shapes=[(4, 3, 3, 3), (5, 3), (7,)], shapes2=[(2, 9)])
    config = case.configs[-1]
    layouts = {"storage": (None, _channels_last, _transposed), "rows": (None, _channels_last, _transposed),
               "contiguous": (_channels_last,)}[case.cls.kernel_layout]
    counts = []
    for param_fn in layouts:
        fns = [(param_fn, _like_param)] * 4
        ps1, ps2 = _params(case, fns)
        opt = _Relayout(case.cls(param_groups(case, config, ps1, ps2), fused=True, **config), fns)
        n0, copies[:] = runtime.launch_count, []
        run(case, [opt], [ps1 + ps2], steps=2 if param_fn is None or case.cls.kernel_layout != "contiguous" else 1)
        counts.append((runtime.launch_count - n0, sum(copies)))
    if case.cls.kernel_layout == "contiguous":
        assert counts[0][1] > 0, counts
    else:  # transposed 2-D params: not rows of storage
        walked = counts[1:] if case.cls.kernel_layout == "storage" else counts[1:2]
        assert all(c == (counts[0][0], 0) for c in walked), counts
        assert all(c[1] > 0 for c in counts[1:] if c not in walked), counts


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("SGD", "Adam", "SGDP", "Adafactor", "NvNovoGrad")],
                         ids=lambda c: c.name)
def test_loaded_states_of_another_layout(case):
    """A checkpoint saved on channels_last / transposed params loads into contiguous ones, and one with contiguous
    states into channels_last / transposed params: the states are relaid like the param at load, and the fused
    step continues the reference path's trajectory (it walks a param and its states in one storage order)."""
    case = dataclasses.replace(case, shapes=[(4, 3, 3, 3), (5, 3), (7,)], shapes2=[(2, 9)])
    config = case.configs[-1]
    fns = [(_channels_last, _like_param), (_transposed, _like_param), (None, None), (_transposed, _like_param)]
    src1, src2 = _params(case, fns)
    src = _Relayout(case.cls(param_groups(case, config, src1, src2), fused=False, **config), fns)
    run(case, [src], [src1 + src2], steps=1)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    for into in (None, fns):  # contiguous params; then the source's layouts, the saved states made contiguous
        opts, lists = [], []
        for fused in (True, False):
            ps1, ps2 = _params(case, into)
            for p, q in zip(ps1 + ps2, src1 + src2):
                p.data.copy_(q.detach())
            opt = case.cls(param_groups(case, config, ps1, ps2), fused=fused, **config)
            sd = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
            saved = [v for st in sd["state"].values() for v in st.values() if isinstance(v, torch.Tensor)]
            if into is None:
                assert not all(v.is_contiguous() for v in saved)
            else:
                sd = copy.deepcopy(sd)
                for st in sd["state"].values():
                    for k, v in st.items():
                        if isinstance(v, torch.Tensor):
                            st[k] = v.contiguous()
            opt.load_state_dict(sd)
            _assert_param_layout(opt, ps1 + ps2)
            opts.append(_Relayout(opt, into or [(None, None)] * 4))
            lists.append(ps1 + ps2)
        run(case, opts, lists, steps=2, seed=5)
        assert_states_close(opts[0]._opt, lists[0], opts[1]._opt, lists[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["Adam", "SGD", "AdamP", "Adafactor"])
def test_state_replaced_with_other_strides_between_steps(name):
    """A state tensor replaced by one of other strides (``state[p][k] = t``, no load_state_dict) is read correctly:
    the fused step checks layouts every step."""
    import fused_optim
    kw = {"SGD": {"lr": 0.1, "momentum": 0.9}, "AdamP": {"lr": 0.01}, "Adafactor": {"lr": 0.01, "betas": (0.9, 0.99)}}
    cls = getattr(fused_optim, name)
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(17, 17, device=DEVICE))
    q = torch.nn.Parameter(p.detach().clone())
    a, b = cls([p], fused=True, **kw.get(name, {})), cls([q], fused=False, **kw.get(name, {}))
    for step in range(4):
        if step == 2:
            for opt, x in ((a, p), (b, q)):
                for k, v in opt.state[x].items():
                    if isinstance(v, torch.Tensor) and v.shape == x.shape:
                        opt.state[x][k] = v.t().contiguous().t()  # same values, transposed strides
        g = torch.randn(17, 17, device=DEVICE)
        p.grad, q.grad = g.clone(), g
        a.step()
        b.step()
        assert_states_close(a, [p], b, [q], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["Adam", "AdamP", "NovoGrad"])
def test_amp_and_clipping_write_unscaled_grads(name):
    """grad_scale (AMP) and max_grad_norm on copied params and grads: p.grad ends unscaled and clipped, as on the
    reference path (an expanded grad, which cannot be written in place, is replaced by the unscaled copy)."""
    import fused_optim
    cls = getattr(fused_optim, name)
    torch.manual_seed(0)
    xs = [torch.randn(9, 6, device=DEVICE) for _ in range(3)]
    fns = [(_transposed, _like_param), (_sliced, lambda g, p: _transposed(g)), (None, _expanded)]
    opts, params = [], []
    for fused in (True, False):
        ps = [torch.nn.Parameter(pf(x.clone()) if pf else x.clone()) for x, (pf, _) in zip(xs, fns)]
        opts.append(cls(ps, lr=0.01, fused=fused, max_grad_norm=0.5))
        params.append(ps)
    for _ in range(3):
        gs = [torch.randn(9, 6, device=DEVICE) * 1024.0 for _ in xs]
        for opt, ps in zip(opts, params):
            for p, g, (_, gf) in zip(ps, gs, fns):
                p.grad = gf(g.clone(), p)
            opt.step(grad_scale=torch.tensor(1024.0, device=DEVICE), found_inf=torch.tensor(0.0, device=DEVICE))
        assert_close([p.grad for p in params[0]], [p.grad for p in params[1]], 1e-5, 1e-6, "unscaled, clipped grads")
        assert_states_close(opts[0], params[0], opts[1], params[1], rtol=1e-5, atol=1e-6)
    assert opts[0].last_grad_norm > 0.5  # the clipping was active


@pytest.mark.parametrize("fused", [False, True])
def test_expanded_param_is_refused_up_front(fused):
    """A param whose elements share memory cannot be updated in place (torch's in-place ops refuse it mid-step):
    a clear error at construction, before any state exists."""
    import fused_optim
    p = torch.nn.Parameter(torch.randn(1, 4, device=DEVICE).expand(3, 4))
    with pytest.raises(ValueError, match="expanded"):
        fused_optim.Adam([p], fused=fused)


def _conv_model(memory_format):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Tanh(), torch.nn.Conv2d(4, 6, 3, bias=False),
                                torch.nn.Tanh(), torch.nn.Conv2d(6, 2, 1))
    return model.to(DEVICE, memory_format=memory_format)


# one optimizer per kind of kernel: element-wise (torch's), per-row projection, factored, per-tensor norms
_MODEL_CASES = [c for c in CASES if c.name in ("SGD", "Adam", "RMSprop", "AdamP", "Adafactor", "NvNovoGrad")
                and c.anchor() is not None]


@pytest.mark.parametrize("case", _MODEL_CASES, ids=lambda c: c.name)
def test_channels_last_conv_model(case):
    """A channels_last conv model trained by the fused path, the reference path and the anchor (torch / timm,
    which take channels_last): the same params and states every step, the states laid out like the params."""
    config = case.configs[-1]
    x = torch.randn(2, 3, 7, 7, device=DEVICE).to(memory_format=torch.channels_last)
    models = [_conv_model(torch.channels_last) for _ in range(3)]
    assert models[0][2].weight.stride()[1] == 1  # channels_last
    opts = [case.anchor()(models[0].parameters(), **config)]
    opts += [case.cls(m.parameters(), fused=fused, **config) for m, fused in ((models[1], False), (models[2], True))]
    for _ in range(STEPS):
        for m, opt in zip(models, opts):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
        ps = [list(m.parameters()) for m in models]
        for opt, p in zip(opts[1:], ps[1:]):
            assert_states_close(opt, p, opts[0], ps[0], rtol=max(case.rtol32, 1e-5), atol=1e-6)
    _assert_param_layout(opts[2], ps[2])
