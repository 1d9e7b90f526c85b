"""Smoke test of bench/run.py on CPU: a few reps; the rows and fields it writes, progress fallback, torch-compile."""
import importlib.util
import json
import os
import shutil

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "bench_run", os.path.join(os.path.dirname(__file__), "..", "bench", "run.py"))
run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run)


def _bench(tmp_path, *args):
    out = tmp_path / "r"
    assert run.main(["--device", "cpu", "--reps", "5", "--warmup", "1", "--out", str(out), *args]) == 0
    assert (tmp_path / "r.md").exists()
    return json.loads((tmp_path / "r.json").read_text())["rows"]


def _check_timed(row):
    itemsize = getattr(torch, row["dtype"]).itemsize
    assert row["bytes"] == row["numel"] * sum(run.STREAMS[row["optimizer"]]) * itemsize
    assert row["ms"] > 0 and row["first_step_ms"] > 0 and row["time_over_ours"] > 0
    assert row["GBs"] == pytest.approx(row["bytes"] / row["ms"] / 1e6, rel=0.01, abs=0.06)  # GBs is rounded to 0.1


def test_rows_default_dtypes_and_progress_fallback(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run, "tqdm", None)  # as without the `bench` extra
    rows = _bench(tmp_path, "--workload", "tiny", "--only", "SGD,Adam", "--no-compile")
    got = {(r["dtype"], r["optimizer"], r["impl"]) for r in rows}
    assert got == {(d, o, i) for d in ("float32", "bfloat16") for o in ("SGD", "Adam")
                   for i in ("ours-reference", "torch-forloop", "torch-foreach")}
    for r in rows:
        assert "error" not in r, r
        assert r["workload"] == "tiny" and r["tensors"] == 500 and r["numel"] == 500 * 256
        _check_timed(r)
        assert r["GBs"] > 0
        assert (r["time_over_ours"] == 1.0) == (r["impl"] == "ours-reference")
    err = capsys.readouterr().err
    assert "[1/4] tiny float32 SGD" in err and "[4/4] tiny bfloat16 Adam" in err


def test_progress_with_tqdm(capsys):
    pytest.importorskip("tqdm")
    assert list(run.progress([1, 2, 3], str)) == [1, 2, 3]
    assert "[1/3]" not in capsys.readouterr().err  # the bar, not the fallback


def test_compile_failure_is_a_row(tmp_path, monkeypatch):
    def no_compile(*args, **kwargs):
        raise RuntimeError("no C++ compiler")
    monkeypatch.setattr(torch, "compile", no_compile)
    monkeypatch.setattr(run, "workloads", lambda device, which: {"mini": [(64,), (8, 8)]})
    rows = _bench(tmp_path, "--only", "SGD", "--dtype", "float32", "--compile")
    by_impl = {r["impl"]: r for r in rows}
    assert by_impl["torch-compile"]["error"] == "RuntimeError: no C++ compiler"
    for impl in ("ours-reference", "torch-forloop", "torch-foreach"):
        _check_timed(by_impl[impl])


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_torch_compile_row(tmp_path, monkeypatch):
    # a tiny workload: compiling the 500-tensor one takes about a minute on CPU
    monkeypatch.setattr(run, "workloads", lambda device, which: {"mini": [(64,), (8, 8)]})
    rows = _bench(tmp_path, "--only", "SGD", "--dtype", "float32", "--compile")
    by_impl = {r["impl"]: r for r in rows}
    assert set(by_impl) == {"ours-reference", "torch-forloop", "torch-foreach", "torch-compile"}
    row = by_impl["torch-compile"]
    assert "error" not in row, row
    _check_timed(row)
    assert row["first_step_ms"] > 10 * row["ms"]  # compilation is in the priming steps, not in the step time
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # dynamo did capture the step
