"""Every optimizer's reference path against its anchor (torch.optim / timm), step by step."""

import pytest
import torch

from cases import MATRIX, MATRIX_IDS, clone_params, param_groups, reference, run, twins
from helpers import assert_states_close, saved

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _pair(case, config, dtype):
    anchor = case.anchor() if case.anchor else None
    if anchor is None:
        pytest.skip(f"{case.name}: no importable anchor (checked by its own test)")
    return twins(case, config, reference(case, config), dtype=dtype)


@pytest.mark.parametrize("case,config", MATRIX, ids=MATRIX_IDS)
@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-10, 1e-12), (torch.float32, None, None)],
                         ids=["f64", "f32"])
def test_matches_anchor_every_step(case, config, dtype, rtol, atol):
    ours, pa, theirs, pb = _pair(case, config, dtype)
    rtol, atol = (case.rtol32, case.atol32) if rtol is None else (rtol, atol)
    for _ in range(case.steps):
        run(case, [ours, theirs], [pa, pb], steps=1, seed=_)
        assert_states_close(ours, pa, theirs, pb, rtol, atol)


@pytest.mark.parametrize("case,config", MATRIX, ids=MATRIX_IDS)
@pytest.mark.parametrize("direction", ["anchor_to_ours", "ours_to_anchor"])
def test_checkpoint_moves_both_ways(case, config, direction):
    """A state_dict saved by one side loads into the other, and both continue on the same trajectory."""
    ours, pa, theirs, pb = _pair(case, config, case.ckpt_dtype)
    run(case, [ours, theirs], [pa, pb], steps=5, seed=0)
    to_ours = direction == "anchor_to_ours"
    src, src_params = (theirs, pb) if to_ours else (ours, pa)
    sd = saved(src.state_dict())  # a real checkpoint: no tensor shared with the source optimizer
    fresh = clone_params(src_params)
    n1 = len(case.shapes)
    groups = param_groups(case, config, fresh[:n1], fresh[n1:])
    loaded = case.cls(groups, fused=False, **config) if to_ours else case.anchor()(groups, **config)
    loaded.load_state_dict(sd)
    # same keys in every param's state, and the source's group keys are all there
    assert [sorted(s) for s in loaded.state_dict()["state"].values()] == [sorted(s) for s in sd["state"].values()]
    for g_loaded, g_src in zip(loaded.state_dict()["param_groups"], sd["param_groups"]):
        assert set(g_src) <= set(g_loaded)
    run(case, [loaded, src], [fresh, src_params], steps=5, seed=7)
    assert_states_close(loaded, fresh, src, src_params, 1e-10, 1e-12)


@pytest.mark.parametrize("case", sorted({c.name: c for c, _ in MATRIX}.values(), key=lambda c: c.name),
                         ids=lambda c: c.name)
def test_same_defaults_and_group_keys(case):
    """Constructor defaults and param-group keys equal the anchor's (ours may add `fused`)."""
    import inspect
    anchor = case.anchor() if case.anchor else None
    if anchor is None:
        pytest.skip("no anchor")
    ours = inspect.signature(case.cls.__init__).parameters
    theirs = inspect.signature(anchor.__init__).parameters
    for name, par in theirs.items():
        if name in ("self", "params"):
            continue
        assert name in ours, f"missing keyword {name}"
        d_ours, d_theirs = ours[name].default, par.default
        if d_theirs is not inspect.Parameter.empty and "required" not in repr(d_theirs):
            assert d_ours == d_theirs, f"{name}: default {d_ours!r} != {d_theirs!r}"
    p = [torch.nn.Parameter(torch.randn(2, 3))]  # 2-D: Muon takes only matrices
    kw = {"lr": 0.1} if "required" in repr(theirs.get("lr").default if "lr" in theirs else None) else {}
    g_ours = case.cls([torch.nn.Parameter(torch.randn(2, 3))], **kw).param_groups[0]
    g_theirs = anchor(p, **kw).param_groups[0]
    assert set(g_theirs) <= set(g_ours) and set(g_ours) - set(g_theirs) <= {"fused"}
    for k in g_theirs:
        if k != "params":
            assert g_ours[k] == g_theirs[k], f"group default {k}: {g_ours[k]!r} != {g_theirs[k]!r}"
