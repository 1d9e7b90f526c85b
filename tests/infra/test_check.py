"""python -m fused_optim.check: passes where the fused path agrees with the reference, fails where it does not."""
import pytest
import torch

from fused_optim import check
from helpers import perturb_fused_adamw


def test_quick_check_passes(capsys):
    # a shared-kernel optimizer (by an alias), a reduction one (timm-anchored), and closure-driven LBFGS
    assert check.main(["--quick", "--only", "momentum,AdamP,lbfgs"]) == 0
    out = capsys.readouterr().out
    assert "torch " + torch.__version__ in out and "C++ engine:" in out
    lines = [line for line in out.splitlines() if " PASS" in line]
    assert [line.split()[0] for line in lines] == ["AdamP", "LBFGS", "SGD"]
    assert "3/3 passed" in out


def test_perturbed_fused_step_fails(capsys, monkeypatch):
    perturb_fused_adamw(monkeypatch, 1 + 1e-4)
    assert check.main(["--quick", "--only", "adamw,sgd"]) == 1
    out = capsys.readouterr().out
    assert "AdamW " in out and out.count("FAIL") == 2  # its line and the summary's
    assert "1/2 passed" in out and "FAILED: AdamW" in out


def test_unknown_name_lists_the_valid_ones(capsys):
    with pytest.raises(SystemExit) as exc:
        check.main(["--only", "adamw,nosuch"])
    assert exc.value.code == 2
    assert "Unknown optimizer 'nosuch'; valid names: adadelta" in capsys.readouterr().err
