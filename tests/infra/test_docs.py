"""Every public optimizer documents itself: ``help(fused_optim.X)`` names its anchor, states its fused path's
launches and its class-specific requirements, and documents the keyword-only options beyond the anchor with
their defaults, in the signature and in the text (the shared part, fused_optim/_docs.py, worded for the class).
A class that loses its docstring, or an option that loses its documentation, fails here."""
import inspect
import pydoc

import pytest
import torch

import fused_optim
from fused_optim import _docs
from fused_optim.anchors import REFERENCE_ANCHORED, TIMM, anchor

OPTIONS = {"fused": None, "master_weights": False, "stochastic_rounding": False, "max_grad_norm": None,
           "param_remainders": False, "state_dtype": None, "int8_min_numel": 4096}
OPTIMIZERS = [n for n in fused_optim.__all__ if isinstance(getattr(fused_optim, n), type)
              and issubclass(getattr(fused_optim, n), torch.optim.Optimizer) and n != "FusedOptimizer"]
CLASSES = [pytest.param(getattr(fused_optim, n), id=n) for n in OPTIMIZERS]
# what a user must know before the first step, by class: words its own docstring must hold
NOTES = {"Adafactor": ["not ``torch.optim.Adafactor``"], "Adahessian": ["create_graph=True"],
         "LBFGS": ["closure", "refused"], "SparseAdam": ["sparse grads", "max_grad_norm is refused"]}


def _anchor_name(name):
    if name in REFERENCE_ANCHORED:
        return "Ginsburg et al. 2019"
    return f"timm.optim.{TIMM[name][1]}" if name in TIMM else f"torch.optim.{name}"


def _flat(text):
    return " ".join(text.split())


def _own(cls):
    """The class's own part of its docstring (before the shared options), whitespace collapsed."""
    return _flat((cls.__doc__ or "").split(_docs.HEADER)[0])


def _shared(cls):
    """The shared part of its docstring, whitespace collapsed."""
    doc = inspect.getdoc(cls)
    assert doc.count(_docs.HEADER) == 1
    return _flat(doc.split(_docs.HEADER)[1])


def test_every_public_optimizer_is_listed():
    assert len(OPTIMIZERS) == 24  # the 19, Lion, Adopt, Lamb, Lars, Muon
    assert set(OPTIMIZERS) == {cls.__name__ for cls in fused_optim.REGISTRY.values()}


@pytest.mark.parametrize("cls", CLASSES)
def test_own_docstring_names_anchor_and_launches(cls):
    name = cls.__name__
    own = _own(cls)
    assert own.strip(), f"{name} has no docstring of its own"
    assert _anchor_name(name) in own
    assert "launch" in own, f"{name}'s docstring does not state its fused path's launches"
    for note in NOTES.get(name, ()):
        assert note in own, f"{name}'s docstring lacks {note!r}"


def _options(cls):
    """The shared options of cls (an anchor's own max_grad_norm, timm's Lamb's, is documented as the anchor's)."""
    return {k: v for k, v in OPTIONS.items() if not (k == "max_grad_norm" and cls.anchor_max_grad_norm)}


@pytest.mark.parametrize("cls", CLASSES)
def test_options_in_signature_and_help(cls):
    name = cls.__name__
    params = inspect.signature(cls).parameters
    for key, default in _options(cls).items():
        assert params[key].kind is inspect.Parameter.KEYWORD_ONLY and params[key].default == default
    text = pydoc.render_doc(cls, renderer=pydoc.plaintext)
    signature = next(line for line in text.splitlines() if line.strip(" |").startswith(f"{name}(params"))
    shared = _shared(cls)
    for key, default in _options(cls).items():
        assert f"{key}={default!r}" in signature
        assert f"{key}={default!r}" in shared, f"{name}: {key} is not documented"


@pytest.mark.parametrize("cls", CLASSES)
def test_keywords_beyond_anchor_are_documented(cls):
    name = cls.__name__
    try:
        anchor_cls = anchor(name)[0]
    except RuntimeError as e:  # a timm anchor without timm installed
        pytest.skip(str(e))
    extra = set(inspect.signature(cls).parameters) - set(inspect.signature(anchor_cls).parameters)
    assert extra <= set(OPTIONS)
    for key in extra:
        assert f"{key}={OPTIONS[key]!r}" in _shared(cls)


@pytest.mark.parametrize("cls", CLASSES)
def test_shared_text_is_worded_for_the_class(cls):
    shared = _shared(cls)
    assert "TRITON_INTERPRET=1" in shared
    if cls.anchor_max_grad_norm:  # the anchor's own argument: no shared entry for it
        assert "max_grad_norm=" not in shared
    elif cls.supports_max_grad_norm:
        assert "clip_grad_norm_" in shared and "last_grad_norm" in shared and "+2" in shared
    else:
        assert "max_grad_norm=None Not supported" in shared
    if not cls.supports_precision_options:
        assert "master_weights=False, stochastic_rounding=False fp32 master copies" in shared
        assert "not supported" in shared
    else:
        assert "state['master_param']" in shared and "4 bytes per param element" in shared
        where = _docs._IN_KERNEL if cls.precision_in_kernel else _docs._ON_REFERENCE
        # master_weights, stochastic_rounding, param_remainders, state_dtype
        assert shared.count(_flat(where)) == 4
