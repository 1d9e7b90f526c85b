"""python -m fused_optim.check: passes where the fused path agrees with the reference, fails where it does not."""
import pytest
import torch

import fused_optim
from fused_optim import check
from helpers import perturb_fused_adamw


def test_quick_check_passes_for_every_optimizer(capsys):
    # what bench/gpu_check.sh runs first (and under compute-sanitizer): every registered optimizer, with the inputs
    # its algorithm needs (Muon matrices, SparseAdam sparse grads, LBFGS a closure, Adahessian the grads' graph)
    assert check.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "torch " + torch.__version__ in out and "C++ engine:" in out
    names = sorted({cls.__name__ for cls in fused_optim.REGISTRY.values()})
    lines = [line for line in out.splitlines() if " PASS" in line]
    assert [line.split()[0] for line in lines] == names
    assert f"{len(names)}/{len(names)} passed" in out


def test_aliases_select_their_optimizer(capsys):
    assert check.main(["--quick", "--only", "momentum,lbfgs"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if " PASS" in line]
    assert [line.split()[0] for line in lines] == ["LBFGS", "SGD"]


def test_interpreter_problem_is_refused_before_anything_runs(capsys, monkeypatch):
    """triton < 3.7's interpreter with numpy >= 2.4 cannot run the kernels: said at construction and by the check,
    not as an interpreter error inside a kernel."""
    import numpy
    import triton
    from fused_optim.kernels import runtime
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.0")
    assert "needs numpy < 2.4, or triton >= 3.7" in runtime.interpreter_problem()
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(RuntimeError, match="AdamW: fused=True on CPU params: Triton 3.6.0's interpreter"):
        fused_optim.AdamW([p], fused=True)
    assert check.main(["--quick", "--only", "adamw"]) == 2
    assert "pip install 'numpy<2.4'" in capsys.readouterr().err
    monkeypatch.setattr(numpy, "__version__", "2.3.5")
    assert runtime.interpreter_problem() == ""
    monkeypatch.setattr(triton, "__version__", "3.7.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.0")
    assert runtime.interpreter_problem() == ""


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
