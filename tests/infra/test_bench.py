"""Smoke test of bench/run.py on CPU: a few reps; the rows and fields it writes, progress fallback, torch-compile."""
import json
import os
import shutil

import pytest
import torch

from fused_optim.kernels import runtime
from helpers import load_script

run = load_script("bench", "run.py")


def _bench(tmp_path, *args):
    out = tmp_path / "r"
    assert run.main(["--device", "cpu", "--reps", "5", "--warmup", "1", "--out", str(out), *args]) == 0
    assert (tmp_path / "r.md").exists()
    return json.loads((tmp_path / "r.json").read_text())["rows"]


def _check_timed(row, states=None):
    """row's bytes follow STREAMS over its params, grads and measured states (`states` element-wise state buffers
    of the params' dtype, when given)."""
    itemsize = getattr(torch, row["dtype"]).itemsize
    reads, writes, state_reads = run.STREAMS[row["optimizer"]]
    if states is not None:
        assert row["state_bytes"] == states * row["numel"] * itemsize
    assert row["bytes"] == row["numel"] * itemsize * (reads + writes) + row["state_bytes"] * (state_reads + 1)
    assert row["ms"] > 0 and row["first_step_ms"] > 0 and row["time_over_ours"] > 0
    # GBs keeps 4 significant digits (a slow CPU step still shows), ms 4 decimals
    assert row["GBs"] == pytest.approx(row["bytes"] / row["ms"] / 1e6, rel=0.01)


def test_rows_default_dtypes_and_progress_fallback(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run, "tqdm", None)  # as without the `bench` extra
    rows = _bench(tmp_path, "--workload", "tiny", "--only", "SGD,Adam", "--no-compile")
    got = {(r["workload"], r["dtype"], r["optimizer"], r["impl"]) for r in rows}
    # the tiny workload brings its one-tensor twin (same bytes): the launch-overhead target compares the two
    assert got == {(w, d, o, i) for w in ("tiny", "tiny-flat") for d in ("float32", "bfloat16")
                   for o in ("SGD", "Adam") for i in ("ours-reference", "torch-forloop", "torch-foreach")}
    ours = {(r["workload"], r["dtype"], r["optimizer"]): r["ms"] for r in rows if r["impl"] == "ours-reference"}
    for r in rows:
        assert "error" not in r, r
        assert r["tensors"] == (500 if r["workload"] == "tiny" else 1) and r["numel"] == 500 * 256
        _check_timed(r, states={"SGD": 1, "Adam": 2}[r["optimizer"]])  # SGD with momentum (run.KW)
        assert r["GBs"] > 0
        assert r["time_over_ours"] == round(r["ms"] / ours[(r["workload"], r["dtype"], r["optimizer"])], 3)
    err = capsys.readouterr().err
    assert "[1/8] tiny float32 SGD" in err and "[8/8] tiny-flat bfloat16 Adam" in err
    assert "## Targets" in (tmp_path / "r.md").read_text()


def test_lean_state_rows_count_their_own_bytes(tmp_path, monkeypatch):
    """--states: rows of ours with int8 / bf16 states beside the anchor's states, bytes from the states they keep
    (a tensor under int8_min_numel keeps fp32 states), time over ours with the anchor's states."""
    monkeypatch.setattr(run, "workloads", lambda device, which: {"mini": [(8192,), (64,)]})
    rows = _bench(tmp_path, "--only", "AdamW", "--dtype", "float32", "--states", "int8", "bfloat16",
                  "--impls", "ours", "--no-compile")
    by_impl = {r["impl"]: r for r in rows}
    assert set(by_impl) == {"ours-reference", "ours-reference-int8", "ours-reference-bfloat16"}
    n = 8192 + 64
    _check_timed(by_impl["ours-reference"], states=2)
    assert by_impl["ours-reference-bfloat16"]["state_bytes"] == 2 * n * 2
    # two moments: codes and one fp32 scale per 256-element block for the large tensor, fp32 for the small one
    assert by_impl["ours-reference-int8"]["state_bytes"] == 2 * (8192 + 8192 // 256 * 4 + 64 * 4)
    base = by_impl["ours-reference"]["ms"]
    for r in rows:
        assert "error" not in r, r
        _check_timed(r)
        assert r["time_over_ours"] == round(r["ms"] / base, 3)
    md = (tmp_path / "r.md").read_text()
    assert "| mini | float32 | AdamW | ours-reference-int8 |" in md


def test_lean_targets_report_time_and_bytes_against_the_anchors_states():
    rows = [{"workload": "large", "dtype": "float32", "optimizer": "AdamW", "impl": "ours-fused", "ms": 1.0,
             "bytes": 28, "pct_copy_bw": 95.0},
            {"workload": "large", "dtype": "float32", "optimizer": "AdamW", "impl": "ours-fused-int8", "ms": 0.8,
             "bytes": 16, "pct_copy_bw": 70.0}]
    lines = run._targets(rows)
    assert "- AdamW float32 large: int8 states / the anchor's states: step time 0.80, bytes moved 0.57" in lines
    assert "- AdamW float32 large, int8 states: % of copy bandwidth: 70.00 (goal >= 90) MISSED by 22%" in lines


def test_only_takes_factory_names_in_any_case(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "workloads", lambda device, which: {"mini": [(64,), (8, 8)]})
    rows = _bench(tmp_path, "--only", "adamw,Momentum,adamp", "--dtype", "float32", "--no-compile")
    assert {r["optimizer"] for r in rows} == {"AdamW", "SGD", "AdamP"}
    assert {r["impl"] for r in rows if r["optimizer"] == "AdamP"} == {"ours-reference", "timm"}  # timm's anchor
    md = (tmp_path / "r.md").read_text()
    assert "| mini | float32 | AdamW | ours-reference |" in md and "issue" not in md.lower()


@pytest.mark.parametrize("only,message", [
    ("adamw,nosuch", "Unknown optimizer 'nosuch'; valid names: adadelta"),
    ("lbfgs", "not benchmarked: LBFGS"),
])
def test_only_refuses_what_it_cannot_run(tmp_path, capsys, only, message):
    with pytest.raises(SystemExit) as exc:
        run.main(["--device", "cpu", "--only", only, "--out", str(tmp_path / "r")])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_targets_say_met_or_missed_by_how_much():
    rows = [{"workload": "large", "dtype": "float32", "optimizer": "Adam", "impl": "ours-fused", "ms": 1.0,
             "pct_copy_bw": 81.0},
            {"workload": "large", "dtype": "float32", "optimizer": "Adam", "impl": "torch-fused", "ms": 1.1},
            {"workload": "tiny", "dtype": "float32", "optimizer": "Adam", "impl": "ours-fused", "ms": 2.0},
            {"workload": "tiny-flat", "dtype": "float32", "optimizer": "Adam", "impl": "ours-fused", "ms": 1.0}]
    lines = run._targets(rows)
    assert "- Adam float32 large: % of copy bandwidth: 81.00 (goal >= 90) MISSED by 10%" in lines
    assert "- Adam float32 large: speedup over torch-fused: 1.10 (goal >= 1.05) met" in lines
    assert any("tiny-flat (one tensor) time: 2.00 (goal <= 1.3) MISSED by 54%" in x for x in lines)


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


def test_host_overhead_stubs_every_launch_and_restores_them(tmp_path):
    """bench/host_overhead.py: one row per optimizer and size; the launches made are the stubs' (Triton kernels
    and the C++ engine alike), and the launch entry points are back afterwards."""
    ho = load_script("bench", "host_overhead.py")
    before = (runtime.dispatch, torch._fused_adam_)
    engine_launches, stubbed = ho._count.engine, ho._count.calls
    out = tmp_path / "ho.md"
    names = ["Adam", "AdamP", "NovoGrad", "Adafactor"]
    assert ho.main(["--tensors", "3", "--only", ",".join(names), "--reps", "2", "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "tensors" not in line]
    assert [r.split(" | ")[0][2:] for r in rows] == names
    assert all(float(r.split(" | ")[2]) > 0 for r in rows)
    assert float(rows[0].split(" | ")[4]) > 0  # Adam: torch's fused path timed beside ours
    # Adam 1, AdamP 2 (engine + apply), NovoGrad 2 (engine + apply), Adafactor 2 (engine + persistent apply):
    # 7 per step, 2 set-up steps + 2 timed reps per row
    assert ho._count.calls - stubbed == 7 * 4
    assert ho._count.engine - engine_launches == 3 * 4
    assert ho._no_torch_kernel.calls > 0  # torch's kernels were stubbed too
    assert (runtime.dispatch, torch._fused_adam_) == before


def test_muon_runs_on_the_matrices_against_torchs(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "workloads", lambda device, which: {"mini": [(64,), (16, 8), (8, 16)]})
    rows = _bench(tmp_path, "--only", "muon", "--dtype", "float32", "--no-compile")
    assert {r["impl"] for r in rows} == {"ours-reference", "torch"}  # torch's Muon has no foreach / fused option
    for r in rows:
        assert "error" not in r, r
        assert r["tensors"] == 2 and r["numel"] == 256  # its matrices only
        _check_timed(r)


def test_lean_gpt_smoke(tmp_path, monkeypatch):
    """bench/lean_gpt.py end to end on both paths, one optimizer, 2 steps: a row per path, a ratio per lean setting."""
    gpt = load_script("bench", "lean_gpt.py")
    monkeypatch.setattr(gpt, "HYPER", {"SGD": gpt.HYPER["SGD"]})
    out = tmp_path / "gpt.md"
    ratios = gpt.main(["--steps", "2", "--paths", "reference", "fused", "--out", str(out)])
    lean = [s for s in gpt.lean_quality.SETTINGS if s != "fp32"]
    assert set(ratios) == {("SGD", p, s) for p in ("reference", "fused") for s in lean}
    assert all(0.9 < r < 1.1 for r in ratios.values()), ratios  # 2 steps: the lean states barely differ yet
    text = out.read_text()
    assert "| SGD | reference |" in text and "| SGD | fused |" in text and "train_gpt's GPT" in text


def test_fsdp_step_times_both_paths_on_shards_and_checks_they_agree(tmp_path):
    """bench/fsdp_step.py on one gloo process (its own process group, so in a subprocess): a tiny GPT under
    fully_shard, ours' fused path (the interpreter) and reference path, a reduction optimizer and the clip: the
    sharded steps ran on DTensor params and ended where the unsharded steps did."""
    import subprocess
    import sys
    out = tmp_path / "fsdp"
    script = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "fsdp_step.py")
    cmd = [sys.executable, script, "--device", "cpu", "--paths", "fused", "reference", "--only",
           "AdamW+clip,NovoGrad", "--reps", "5", "--warmup", "0", "--model", "vocab=32", "d_model=16",
           "n_layers=1", "n_heads=2", "seq_len=8", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "fsdp.json").read_text())
    assert data["meta"]["world_size"] == 1
    rows = {(r["optimizer"], r["impl"]): r for r in data["rows"]}
    assert set(rows) == {(o, i) for o in ("AdamW+clip", "NovoGrad") for i in ("ours-fused", "ours-reference")}
    n_params = 17  # tok, pos; the block's 2 LayerNorms (2 each), attention in / out (2 each), MLP (4); ln (2), head
    for r in rows.values():
        assert "unsharded_error" not in r and "sharded_error" not in r, r
        assert r["unsharded_ms"] > 0 and r["sharded_ms"] > 0
        assert r["dtensor_params"] == n_params
        assert r["max_rel_param_diff"] <= 1e-6, r  # one rank: the same steps, to fp32 rounding
    assert "| NovoGrad | ours-fused |" in (tmp_path / "fsdp.md").read_text()


def test_gpu_check_plans_every_stage_within_its_budget():
    """bench/gpu_check.sh --dry-run: every stage with its time cap (the requirements taken as present), the scripts
    it runs exist, and no stage's cap exceeds the budget."""
    import re
    import subprocess
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=root, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "BUDGET": "570"})
    assert done.returncode == 0, done.stderr
    stages = re.findall(r"^== (.+) \(cap (\d+)s\) > (\S+): (.*)$", done.stdout, re.M)
    names = [s[0] for s in stages]
    assert names == ["self-check", "memcheck", "racecheck", "synccheck", "build csrc (CUDA)", "tests on CUDA",
                     "benchmarks", "benchmarks (lean states)", "FSDP2 step (world size 1)",
                     "benchmarks (torch.compile)", "lean states on train_gpt (fused)"]
    assert all(0 < int(cap) <= 570 for _, cap, _, _ in stages)
    scripts = {w for *_, cmd in stages for w in cmd.split() if w.endswith((".py", ".sh"))}
    assert scripts >= {"bench/run.py", "bench/fsdp_step.py", "bench/lean_gpt.py", "scripts/build_csrc.sh"}
    assert all(os.path.exists(os.path.join(root, s)) for s in scripts), scripts
