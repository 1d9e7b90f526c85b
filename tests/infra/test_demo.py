"""examples/demo.py (the main job): fused_optim's fused path against the real anchor, for any factory name."""
import os

import pytest
import torch

from helpers import load_script, perturb_fused_adamw

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")


@pytest.fixture
def demo(monkeypatch):
    monkeypatch.syspath_prepend(EXAMPLES)  # as when run as a script: it imports examples/timing.py
    return load_script("examples", "demo.py")


@pytest.mark.parametrize("name,anchor", [("adamw", "torch.optim.AdamW"), ("LBFGS", "torch.optim.LBFGS"),
                                         ("AdamP", "timm.optim.AdamP"), ("sparse", "torch.optim.SparseAdam")])
def test_agrees_with_the_real_anchor(demo, capsys, name, anchor):
    assert demo.main(["--optimizer", name, "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert f"anchor: {anchor}\n" in out and "PASS: fused_optim agrees with the anchor" in out
    if not torch.cuda.is_available():
        assert "CPU: fused Triton kernels run in Triton's interpreter; step times are not GPU times" in out


def test_disagreement_says_why(demo, capsys, monkeypatch):
    perturb_fused_adamw(monkeypatch, 1 + 1e-3)
    assert demo.main(["--optimizer", "AdamW", "--steps", "3"]) == 1
    out = capsys.readouterr().out
    assert "FAIL: max relative param difference 3.0e-03 exceeds 1e-04" in out  # three steps, 1e-3 each


def test_unknown_name_is_a_usage_error(demo, capsys):
    with pytest.raises(SystemExit) as exc:
        demo.main(["--optimizer", "nosuch"])
    assert exc.value.code == 2 and "valid names: adadelta" in capsys.readouterr().err
