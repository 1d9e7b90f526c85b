"""Checkpoints across implementations: ours continuing a torch.optim checkpoint takes the steps torch takes
continuing it (plain and Tensor hyper-parameters, reference and fused paths), the constructor's ``fused`` survives
``load_state_dict``, and a saved-then-loaded optimizer's ``state_dict()`` equals the original's."""
import copy
import inspect

import pytest
import torch

from cases import ALL, clone_params, make_params, param_groups, reference, run, twins
from helpers import assert_states_close, saved

import fused_optim
from fused_optim.kernels import runtime

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TORCH_CASES = [c for c in ALL if c.anchor and c.anchor().__module__.startswith("torch.optim")]
_IDS = [f"{c.name}{'' if c.dense_grads else '-sparse'}" for c in TORCH_CASES]


def _with_tensors(case, config):
    """config with its lr (and betas, weight_decay where the anchor takes Tensors for them) as 0-d Tensors."""
    sig = inspect.signature(case.anchor().__init__).parameters
    out = dict(config, lr=torch.tensor(float(config.get("lr", sig["lr"].default))))
    if "betas" in sig and "Tensor" in str(sig["betas"].annotation):
        out["betas"] = tuple(torch.tensor(float(b)) for b in config.get("betas", sig["betas"].default))
    if "weight_decay" in sig and "Tensor" in str(sig["weight_decay"].annotation):
        out["weight_decay"] = torch.tensor(float(config.get("weight_decay", sig["weight_decay"].default)))
    return out


def _group2(case, tensors):
    g2 = dict(case.group2)
    if tensors and "lr" in g2:
        g2["lr"] = torch.tensor(float(g2["lr"]))
    return g2


def _continue_torch_checkpoint(case, config, dtype, fused, tensors):
    """torch runs 3 steps and saves; ours and a fresh torch load the checkpoint and run 5 more steps each."""
    if tensors:
        config = _with_tensors(case, config)
    g2 = _group2(case, tensors)

    def groups(ps1, ps2):
        gs = param_groups(case, config, ps1, ps2)
        if len(gs) > 1:
            gs[1].update(g2)
        return gs

    n1 = len(case.shapes)
    b1, b2 = make_params(case, dtype)
    theirs = case.anchor()(groups(b1, b2), **config)
    run(case, [theirs], [b1 + b2], steps=3, seed=0)
    sd = theirs.state_dict()
    pa, pb = clone_params(b1 + b2), clone_params(b1 + b2)
    ours = case.cls(groups(pa[:n1], pa[n1:]), fused=fused, **config)
    again = case.anchor()(groups(pb[:n1], pb[n1:]), **config)
    ours.load_state_dict(saved(sd))
    again.load_state_dict(saved(sd))
    assert [g["fused"] for g in ours.param_groups] == [fused] * len(ours.param_groups)
    n0 = runtime.launch_count
    run(case, [ours, again], [pa, pb], steps=5, seed=7)
    if fused:
        assert runtime.launch_count > n0, "fused=True ran no kernel after load_state_dict"
    return ours, pa, again, pb


@pytest.mark.parametrize("tensors", [False, True], ids=["floats", "tensors"])
@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-10, 1e-12), (torch.float32, 1e-6, 1e-7)],
                         ids=["f64", "f32"])
@pytest.mark.parametrize("case", TORCH_CASES, ids=_IDS)
def test_reference_continues_torch_checkpoint(case, dtype, rtol, atol, tensors):
    for config in case.configs:
        ours, pa, theirs, pb = _continue_torch_checkpoint(case, config, dtype, False, tensors)
        assert_states_close(ours, pa, theirs, pb, rtol, atol)


@pytest.mark.parametrize("tensors", [False, True], ids=["floats", "tensors"])
@pytest.mark.parametrize("case", [c for c in TORCH_CASES if c.kernel], ids=[i for c, i in zip(TORCH_CASES, _IDS)
                                                                            if c.kernel])
def test_fused_continues_torch_checkpoint(case, tensors):
    ours, pa, theirs, pb = _continue_torch_checkpoint(case, case.configs[-1], torch.float32, True, tensors)
    assert_states_close(ours, pa, theirs, pb, case.rtol32, case.atol32)


@pytest.mark.parametrize("case", TORCH_CASES, ids=_IDS)
def test_tensor_hyperparameters_match_torch(case):
    """Constructed with Tensor hyper-parameters, ours takes torch's steps (torch's scalar math in their dtype)."""
    config = _with_tensors(case, case.configs[-1])
    ours, pa, theirs, pb = twins(case, config, reference(case, config))
    run(case, [ours, theirs], [pa, pb], steps=5, seed=3)
    assert_states_close(ours, pa, theirs, pb, 1e-10, 1e-12)


def _assert_same(a, b, what):
    """Equal structure, keys, types, tensor dtypes and values."""
    assert type(a) is type(b), f"{what}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{what}: keys {list(a)} != {list(b)}"
        for k in a:
            _assert_same(a[k], b[k], f"{what}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{what}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{what}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device), f"{what}: {a.dtype} != {b.dtype}"
        assert torch.equal(a, b), f"{what}: values differ"
    else:
        assert a == b, f"{what}: {a!r} != {b!r}"


_BY_CLASS = list({c.name: c for c in ALL}.values())  # one case per optimizer (its dense-grad one first)


@pytest.mark.parametrize("case", _BY_CLASS, ids=[c.name for c in _BY_CLASS])
def test_saved_then_loaded_state_dict_is_the_original(case):
    config = case.configs[-1]
    n1 = len(case.shapes)
    a1, a2 = make_params(case)
    ours = case.cls(param_groups(case, config, a1, a2), fused=False, **config)
    run(case, [ours], [a1 + a2], steps=3, seed=0)
    fresh = clone_params(a1 + a2)
    loaded = case.cls(param_groups(case, config, fresh[:n1], fresh[n1:]), fused=False, **config)
    loaded.load_state_dict(saved(ours.state_dict()))
    _assert_same(loaded.state_dict(), ours.state_dict(), "state_dict")


def test_fused_is_no_state():
    """`fused` survives load_state_dict group by group, and a checkpoint saves torch's default (None): torch takes the
    key on load, and fused=True would put it on its fused SGD, which refuses the embedding's sparse grads."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(6, 3, sparse=True), torch.nn.Linear(3, 1))

    def groups(m):
        return [{"params": list(m[0].parameters()), "fused": False}, {"params": list(m[1].parameters())}]

    def steps(pairs, seed):
        idx = torch.randint(0, 6, (4,), generator=torch.Generator().manual_seed(seed))
        for m, opt in pairs:
            opt.zero_grad()
            torch.tanh(m(idx)).sum().backward()
            opt.step()

    ours = fused_optim.SGD(groups(model), lr=0.1, momentum=0.9, fused=True)
    steps([(model, ours)], 0)
    sd = saved(ours.state_dict())
    assert [g["fused"] for g in sd["param_groups"]] == [None, None]
    again, theirs = torch.nn.Sequential(*map(copy.deepcopy, model)), torch.nn.Sequential(*map(copy.deepcopy, model))
    loaded = fused_optim.SGD(groups(again), lr=0.1, momentum=0.9, fused=True)
    loaded.load_state_dict(saved(sd))  # (loading aliases the checkpoint's tensors: one copy each)
    assert [g["fused"] for g in loaded.param_groups] == [False, True]
    torch_opt = torch.optim.SGD(groups(theirs), lr=0.1, momentum=0.9)
    torch_opt.load_state_dict(saved(sd))
    for i in range(1, 4):
        steps([(model, ours), (again, loaded), (theirs, torch_opt)], i)
    for p, q, r in zip(model.parameters(), again.parameters(), theirs.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(r, p, rtol=1e-6, atol=1e-7)


def _types(sd):
    """What kind each saved entry is: a Python number or a tensor (and its rank), per state key and group key."""
    kind = lambda v: f"tensor{v.dim()}" if isinstance(v, torch.Tensor) else type(v).__name__  # noqa: E731
    return ([{k: kind(v) for k, v in st.items()} for _, st in sorted(sd["state"].items())],
            [{k: kind(v) for k, v in g.items() if k != "params"} for g in sd["param_groups"]])


@pytest.mark.parametrize("case", [c for c in _BY_CLASS if c.kernel], ids=[c.name for c in _BY_CLASS if c.kernel])
def test_fused_checkpoint_has_the_reference_types(case):
    """A fused step's checkpoint holds each entry as the reference path's (the anchor's) type, e.g. timm's int
    ``step`` where the fused path keeps a 0-d device tensor: DCP's loader requires the types to agree, so only
    then does a checkpoint of one path load into the other and into the anchor."""
    config = case.configs[-1]
    sds = []
    for fused in (False, True):
        a1, a2 = make_params(case)
        opt = case.cls(param_groups(case, config, a1, a2), fused=fused, **config)
        run(case, [opt], [a1 + a2], steps=1, seed=0)
        sds.append(_types(opt.state_dict()))
    assert sds[0] == sds[1]
