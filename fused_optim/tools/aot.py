"""Ahead-of-time compile every Triton kernel specialization the package launches, with no GPU.

    python -m fused_optim.tools.aot [--arch 80 90] [--check] [--json out.json] [--only NAME] [--sass]

The inventory (``inventory()``) is derived from the code, so it cannot fall behind it:
* the shared multi-tensor kernel, once per registered optimizer x option variant (its ``_kernel_rule`` on a group
  with those options) x dtype combination x aligned / unaligned variant;
* every dedicated kernel an optimizer module lists in a module-level ``aot_kernels()`` function.

For each entry and each target (sm_80, sm_90) it reports: compiled or the error, registers, local memory (spills)
and shared memory (triton's bundled cuobjdump on the cubin), and the widest global load and store from the PTX
(ptxas emits one SASS access per PTX vector access; ``--sass`` disassembles every cubin and checks that, at about
0.5 s a kernel). ``--check`` exits non-zero if any entry fails to compile, spills, or (aligned element-wise
entries) has no 128-bit global loads and stores on its full-chunk path. ``check_complete()`` verifies that every ``triton.jit`` function
defined in the package is reachable from the inventory.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise SystemExit("fused_optim.tools.aot compiles real kernels: unset TRITON_INTERPRET")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fused_optim.tools.inventory import Entry, check_complete, inventory  # noqa: E402,F401

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")

# a global load or store in PTX, e.g. ld.global.v4.b32 (128 bits), @%p1 st.global.L1::evict_last.b16, ld.global.b64
_PTX_ACCESS = re.compile(r"\b(ld|st)\.global(?:\.[A-Za-z0-9_:]+)*?\.(?:v(\d)\.)?[bfsu](8|16|32|64)\b")


def _access_report(ptx: str) -> dict:
    """The widest global load and store (bits) and the number of 128-bit ones, from the PTX: ptxas emits one SASS
    access per PTX vector access (LDG.E.128 for ld.global.v4.b32), which ``--sass`` verifies on the cubin."""
    bits = {"ld": [], "st": []}
    for op, vec, width in _PTX_ACCESS.findall(ptx):
        bits[op].append(int(vec or 1) * int(width))
    return {"ld_bits": max(bits["ld"], default=0), "st_bits": max(bits["st"], default=0),
            "ld128": bits["ld"].count(128), "st128": bits["st"].count(128)}


def _cuobjdump(cubin: bytes, what: str) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([os.path.join(_BIN, "cuobjdump"), what, path], capture_output=True, text=True,
                              check=True).stdout


def _resources(cubin: bytes) -> dict:
    res = _cuobjdump(cubin, "--dump-resource-usage")

    def field_of(key):
        m = re.search(rf"\b{key}:(\d+)", res)
        return int(m.group(1)) if m else 0

    return {"regs": field_of("REG"), "local": field_of("LOCAL"), "stack": field_of("STACK"),
            "shared": field_of("SHARED")}


def _sass_widths(cubin: bytes) -> tuple:
    """(widest LDG, widest STG, any LDG.E.128, any STG.E.128) of the SASS (disassembly: about 0.5 s per kernel,
    more than the compile)."""
    sass = _cuobjdump(cubin, "--dump-sass")

    def widest(op):
        # e.g. LDG.E.128 (16 B), LDG.E.64, LDG.E (32-bit), LDG.E.U16 (bf16/fp16 scalar)
        widths = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}
        bits = [max([widths.get(part, 0) for part in ins.split(".")] + [0]) or 32
                for ins in re.findall(rf"\b{op}(?:\.[A-Z0-9_]+)+", sass)]
        return max(bits, default=0)

    return (widest("LDG"), widest("STG"), bool(re.search(r"\bLDG\.E\.128\b", sass)),
            bool(re.search(r"\bSTG\.E\.128\b", sass)))


def compile_entry(e: Entry, arch: int, sass: bool = False) -> dict:
    t0 = time.perf_counter()
    row = {"name": e.name, "arch": arch}
    try:
        src = ASTSource(fn=e.fn, signature=e.signature, constexprs=e.constexprs)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=e.options)
        row.update(ok=True, **_resources(k.asm["cubin"]), **_access_report(k.asm["ptx"]))
        if sass:
            row["sass"] = _sass_widths(k.asm["cubin"])
    except Exception as exc:  # noqa: BLE001 - every failure is reported, and --check fails on it
        root = exc
        while root.__cause__ is not None:  # triton chains CompilationErrors up the call stack: report the origin
            root = root.__cause__
        lines = str(root).strip().splitlines() or [""]
        row.update(ok=False, error=f"{type(root).__name__}: {lines[-1][:300]}")
    row["seconds"] = round(time.perf_counter() - t0, 2)
    problems = []
    if not row["ok"]:
        problems.append("does not compile")
    else:
        if row["local"]:  # register spills land in local memory (the ABI stack frame alone is not a spill)
            problems.append(f"spills ({row['local']} B local memory per thread)")
        if e.vector_check and not (row["ld128"] and row["st128"]):
            problems.append(f"no 128-bit loads/stores (widest load {row['ld_bits']}, store {row['st_bits']})")
        ptx = (row["ld_bits"], row["st_bits"], row["ld128"] > 0, row["st128"] > 0)
        if sass and row["sass"] != ptx:
            problems.append(f"SASS accesses {row['sass']} differ from the PTX's {ptx}")
    row["problems"] = problems
    return row


_ENTRIES: list = []


def _compile_job(job):
    i, arch, sass = job
    return compile_entry(_ENTRIES[i], arch, sass)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--check", action="store_true", help="exit 1 on any compile failure, spill or narrow access")
    ap.add_argument("--json", help="write all rows to this file")
    ap.add_argument("--only", help="compile only entries whose name contains this")
    ap.add_argument("--list", action="store_true", help="print the inventory and the completeness check only")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--sass", action="store_true",
                    help="also disassemble each cubin and check its access widths are the PTX's (slower)")
    args = ap.parse_args(argv)

    global _ENTRIES
    entries = inventory()
    missing = check_complete(entries)
    if args.only:
        entries = [e for e in entries if args.only in e.name]
    _ENTRIES = entries
    if args.list:
        for e in entries:
            print(e.name)
        print(f"{len(entries)} entries; not covered: {missing or 'none'}")
        return 1 if missing else 0
    rows = []
    print(f"{'kernel':60s} {'sm':>3s} {'ok':>3s} {'regs':>4s} {'spill':>5s} {'ld':>4s} {'st':>4s}  problems")
    jobs = [(i, arch, args.sass) for i in range(len(entries)) for arch in args.arch]
    with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
        # fork: workers inherit the inventory (JIT functions do not pickle); each job is an index
        for (i, arch, _), r in zip(jobs, pool.imap(_compile_job, jobs)):
            e = entries[i]
            rows.append(r)
            print(f"{e.name[:60]:60s} {arch:3d} {'yes' if r['ok'] else 'NO':>3s} {r.get('regs', 0):4d} "
                  f"{r.get('local', 0):5d} {r.get('ld_bits', 0):4d} {r.get('st_bits', 0):4d}  "
                  f"{'; '.join(r['problems']) or '-'}{'  ' + r['error'] if not r['ok'] else ''}", flush=True)
    bad = [r for r in rows if r["problems"]]
    print(f"{len(rows)} compiles ({len(entries)} kernels x {len(args.arch)} targets), {len(bad)} with problems; "
          f"jit functions not in the inventory: {missing or 'none'}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "rows": rows, "missing": missing}, f, indent=1)
    return 1 if args.check and (bad or missing) else 0


if __name__ == "__main__":
    sys.exit(main())
