"""The AOT inventory is complete, and the checker catches kernels that do not compile or run narrow.

The full sm_80/sm_90 compile of every entry runs in CI as its own step (`python -m fused_optim.tools.aot --check`),
outside pytest; these tests run the tool in a subprocess because the test session uses the interpreter.
"""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")
ENV = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSED_OPTIM_BLOCK", "FUSED_OPTIM_ITERS")}


def _py(code: str, tmp_path):
    script = tmp_path / "script.py"  # triton.jit reads the kernel's source file
    script.write_text(textwrap.dedent(code))
    return subprocess.run([sys.executable, str(script)], env=ENV, capture_output=True, text=True, timeout=600)


def test_inventory_covers_every_jit_function(tmp_path):
    r = _py("""
        from fused_optim.tools import aot
        import fused_optim
        entries = aot.inventory()
        print("MISSING", aot.check_complete(entries))
        print("CLASSES", sorted({e.name.split("[")[0] for e in entries}))
        print("WITH_KERNEL", sorted(c.__name__ for c in fused_optim.REGISTRY.values() if c._has_kernel()))
        names = [e.name for e in entries]
        print("REPEATED", sorted({n for n in names if names.count(n) > 1}))
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines() if line.split(" ")[0].isupper())
    assert lines["MISSING"] == "[]", lines["MISSING"]
    assert lines["REPEATED"] == "[]", lines["REPEATED"]  # one name, one specialization (a repeat: compiled twice)
    with_kernel = eval(lines["WITH_KERNEL"])
    assert with_kernel and set(with_kernel) <= set(eval(lines["CLASSES"]))


def test_checker_flags_a_broken_kernel_and_a_narrow_one(tmp_path):
    r = _py("""
        import triton, triton.language as tl
        from fused_optim.tools import aot

        @triton.jit
        def broken(x, N: tl.constexpr):
            tl.store(x + tl.arange(0, N), undefined_name)

        @triton.jit
        def scalar_width(x, N: tl.constexpr):
            offs = tl.arange(0, N)
            tl.store(x + offs, tl.load(x + offs, mask=offs < 3) + 1.0, mask=offs < 3)  # masked: no vector hint

        @triton.jit
        def vector_width(x, N: tl.constexpr):  # x: an int64 address, as the kernels' tables hold them
            p = tl.multiple_of(tl.load(x.to(tl.pointer_type(tl.int64))).to(tl.pointer_type(tl.float32)), 16)
            offs = tl.arange(0, N)
            tl.store(p + offs, tl.load(p + offs) * 2.0)

        for fn in (broken, scalar_width, vector_width):
            e = aot.Entry(fn.__name__, fn, {"x": "*fp32", "N": "constexpr"}, {"N": 1024}, vector_check=True)
            row = aot.compile_entry(e, 90, sass=fn is not broken)  # the PTX's widths checked against the SASS
            print(fn.__name__, row["problems"], row.get("ld_bits"), row.get("st_bits"))
    """, tmp_path)
    assert r.returncode == 0, r.stderr
    out = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert "does not compile" in out["broken"]
    assert "no 128-bit" in out["scalar_width"] and "differ" not in out["scalar_width"]
    assert out["scalar_width"].endswith("32 32")
    assert out["vector_width"] == "[] 128 128"
