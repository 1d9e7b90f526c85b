"""Ahead-of-time compile every Triton kernel specialization the package launches, with no GPU.

    python -m fused_optim.tools.aot [--arch 80 90] [--check] [--json out.json] [--only NAME]

The inventory (``inventory()``) is derived from the code, so it cannot fall behind it:
* the shared multi-tensor kernel, once per registered optimizer x option variant (its ``_kernel_rule`` on a group
  with those options) x dtype combination x aligned / unaligned variant;
* every dedicated kernel an optimizer module lists in a module-level ``aot_kernels()`` function.

For each entry and each target (sm_80, sm_90) it reports: compiled or the error, registers, local memory (spills),
shared memory, and from the SASS (triton's bundled cuobjdump) the widest global load and store. ``--check`` exits
non-zero if any entry fails to compile, spills, or (aligned element-wise entries) has no 128-bit
global loads and stores on its full-chunk path. ``check_complete()`` verifies that every ``triton.jit`` function
defined in the package is reachable from the inventory.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import itertools
import json
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise SystemExit("fused_optim.tools.aot compiles real kernels: unset TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import fused_optim  # noqa: E402
from fused_optim.kernels import multi_tensor as mt, runtime  # noqa: E402
from fused_optim.kernels import rules  # noqa: E402

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_SKIP_BOOLS = {"foreach", "capturable", "differentiable", "fused"}


@dataclass
class Entry:
    name: str
    fn: JITFunction
    signature: dict
    constexprs: dict
    options: dict = field(default_factory=dict)
    vector_check: bool = False  # aligned element-wise entry: must use 128-bit loads/stores


def multi_tensor_signature() -> dict:
    """Runtime argument types of the shared kernel (constexprs filled separately)."""
    ptr = {"ptrs": "*i64", "numels": "*i64", "work": "*i32", "sptrs": "*i64", "counters": "*i32",
           "lr_ptr": "*fp32", "scale_ptr": "*fp32", "inf_ptr": "*fp32", "hp": "*fp64", "seed": "i32",
           "partials": "*fp64", "stats": "*fp64", "barrier": "*i32", "n_items": "i32"}
    sig = {}
    for name in mt.multi_tensor_apply_kernel.arg_names:
        if name in ptr:
            sig[name] = ptr[name]
        else:
            sig[name] = "constexpr"
    return sig


def option_variants(cls) -> list[dict]:
    """Representative option sets: defaults, each boolean option alone, everything on (with momentum/decay)."""
    if getattr(cls, "kernel_variants", None) is not None:
        return list(cls.kernel_variants)
    params = inspect.signature(cls.__init__).parameters
    bools = [n for n, p in params.items() if p.default is False and n not in _SKIP_BOOLS]
    numeric = {k: v for k, v in (("momentum", 0.9), ("weight_decay", 0.1)) if k in params}
    variants = [{}, *({b: True} for b in bools), {**{b: True for b in bools}, **numeric}]
    if numeric:
        variants.append(numeric)
    return variants


def _rules_of(cls):
    """(variant name, Rule, n states, n scalars, subvariant) for each option variant of an optimizer class."""
    probe = cls([torch.nn.Parameter(torch.ones(2, 2))], fused=False, **({"lr": 0.1} if _lr_required(cls) else {}))
    seen, out = set(), []
    for variant in option_variants(cls):
        group = {**probe.param_groups[0], **variant}
        for sub in getattr(cls, "kernel_subvariants", (None,)):
            rule, keys, skeys = probe._kernel_rule(group, sub)
            sig = (rule.update, rule.scalars, rule.flags, len(keys), len(skeys))
            if sig not in seen:
                seen.add(sig)
                label = ",".join(f"{k}={v}" for k, v in variant.items()) or "default"
                out.append((label + (f",variant={sub}" if sub is not None else ""), rule, len(keys), len(skeys), sub))
    return out


def _lr_required(cls) -> bool:
    p = inspect.signature(cls.__init__).parameters.get("lr")
    return p is not None and (p.default is inspect.Parameter.empty or "required" in repr(p.default))


# (param, grad, state) dtypes, aligned, AMP args (True: grad_scale and found_inf; "inf": found_inf only, a launch
# after the grads were unscaled; "clip": grad_scale only, which is
# how max_grad_norm alone reaches the kernel). Every option variant is compiled for aligned fp32; the first
# (defaults) also for bf16, fp16 with AMP scaling and fp64 (FIRST_VARIANTS); the last (every option on, the most
# code) for all of DTYPE_VARIANTS: unaligned fp32, bf16, fp16 with AMP scaling, fp32 with clipping,
# bf16 with an fp32 master copy (fp32 states), bf16 with stochastic rounding, bf16 with int16 remainders
# (param_remainders, fp32 states), fp32 with bf16 states (state_dtype) rounded to nearest and stochastically, and
# fp64 (fp64 math), plain and with clipping (an fp64 clip scale). Plain fp64 entries of rules with per-tensor scalars
# beyond ``step`` also come with those scalars fp64 (a checkpoint loaded into fp64 params; NovoGrad's moments and
# norms). master: mt.MASTER_FP32 / mt.REMAINDER; sr: True (params) or "states".
FP32 = ((torch.float32,) * 3, True, False, False, False)
BF16 = torch.bfloat16
FP64 = (torch.float64,) * 3
DTYPE_VARIANTS = [FP32, ((torch.float32,) * 3, False, False, False, False), ((BF16,) * 3, True, False, False, False),
                  ((torch.float16,) * 3, True, True, False, False), ((torch.float32,) * 3, True, "clip", False, False),
                  ((BF16, BF16, torch.float32), True, False, mt.MASTER_FP32, False),
                  ((BF16,) * 3, True, False, False, True),
                  ((BF16, BF16, torch.float32), True, False, mt.REMAINDER, False),
                  ((torch.float32, torch.float32, BF16), True, False, False, False),
                  ((torch.float32, torch.float32, BF16), True, False, False, "states"),
                  (FP64, True, False, False, False), (FP64, True, "clip", False, False)]
FIRST_VARIANTS = [DTYPE_VARIANTS[i] for i in (0, 2, 3, -2)]
_MASTER_NAMES = {mt.MASTER_FP32: " master", mt.REMAINDER: " remainders"}


def _scalar_f64_variants(dts, nt: int, amp) -> tuple:
    """SCALAR_F64 bit sets to compile: none, and for plain fp64 params every scalar slot but ``step`` (slot 0) fp64."""
    if dts[0] != torch.float64 or nt < 2 or amp:
        return (0,)
    return 0, sum(1 << (rules.SCALAR_F64_FIRST + k) for k in range(1, nt))


def inventory() -> list[Entry]:
    entries = []
    sig = multi_tensor_signature()
    for name, cls in sorted(fused_optim.REGISTRY.items()):
        if not cls._has_kernel():
            continue
        rules = _rules_of(cls)
        n_sub = len(getattr(cls, "kernel_subvariants", (None,)))  # the first and last option variant: every launch
        seen = set()
        for i, (label, rule, ns, nt, sub) in enumerate(rules):
            # a rule with a statistics pass: its persistent launch, and each pass alone (the refused fallback)
            passes_of = [(mt.P_STATS, mt.P_APPLY), (mt.P_STATS,), (mt.P_APPLY,)] if rule.stats else [(mt.P_APPLY,)]
            variants = (DTYPE_VARIANTS if i >= len(rules) - n_sub else FIRST_VARIANTS if i < n_sub else [FP32])
            for (dts, aligned, amp, master, sr), passes in itertools.product(variants, passes_of):
                if (master or sr) and not cls.precision_in_kernel:
                    continue
                if hasattr(cls, "aot_launch"):  # a launch that sees other dtypes / AMP arguments than the group's
                    dts, amp, master, sr = cls.aot_launch(sub, dts, amp, master, sr)
                if dts[0] != dts[2] == BF16 and not ns:  # no states: the state dtype changes nothing
                    continue
                sr_bits = (mt.SR_PARAM if sr is True else 0) | (mt.SR_STATES if sr == "states" else 0)
                for f64 in _scalar_f64_variants(dts, nt, amp):
                    key = (rule.update, rule.scalars, rule.stats, rule.flags, ns, nt, dts, aligned, amp, int(master),
                           sr_bits, passes, f64)
                    if key in seen:  # two group dtypes that make the same launch
                        continue
                    seen.add(key)
                    cx = mt.constexprs(rule, dts, ns, nt, lr_tensor=False, has_scale=amp in (True, "clip"),
                                       has_inf=amp in (True, "inf"), aligned=aligned, master=int(master), sr=sr_bits,
                                       passes=passes, scalar_f64=f64)
                    dname = "/".join(str(d).replace("torch.", "") for d in (dts[:1] if len(set(dts)) == 1 else dts))
                    pname = f" pass {'+'.join(map(str, passes))}" if rule.stats else ""
                    # the clip scale of fp64 grads is fp64
                    esig = {**sig, "scale_ptr": "*fp64"} if amp == "clip" and dts[0] == torch.float64 else sig
                    entries.append(Entry(f"{cls.__name__}[{label}]{pname} {dname}{'' if aligned else ' unaligned'}"
                                         f"{' ' + str(amp).replace('True', 'amp') if amp else ''}"
                                         f"{_MASTER_NAMES.get(int(master), '')}{' sr' if sr is True else ''}"
                                         f"{' sr-states' if sr == 'states' else ''}{' f64 scalars' if f64 else ''}",
                                         mt.multi_tensor_apply_kernel, esig, cx,
                                         runtime.compile_options(), vector_check=aligned and mt.P_APPLY in passes))
    # every kernel family module (kernels/*.py) and every optimizer module may list dedicated kernels
    kernel_modules = {importlib.import_module(f"fused_optim.kernels.{m.name}")
                      for m in pkgutil.iter_modules(fused_optim.kernels.__path__)}
    modules = {sys.modules[c.__module__] for c in fused_optim.REGISTRY.values()} | kernel_modules
    for mod in sorted(modules, key=lambda m: m.__name__):
        if hasattr(mod, "aot_kernels"):
            entries.extend(Entry(**e) if isinstance(e, dict) else e for e in mod.aot_kernels())
    return entries


def _jit_functions_in_package() -> set:
    found = set()
    for name, mod in list(sys.modules.items()):
        if name == "fused_optim" or name.startswith("fused_optim."):
            for obj in vars(mod).values():
                if isinstance(obj, JITFunction) and obj.fn.__module__ == name:
                    found.add(obj)
    return found


def _reachable(entries) -> set:
    """JIT functions reachable from the inventory: kernels, constexpr functions, and what they call."""
    todo = [e.fn for e in entries] + [v for e in entries for v in e.constexprs.values() if isinstance(v, JITFunction)]
    seen = set()
    while todo:
        fn = todo.pop()
        if fn in seen:
            continue
        seen.add(fn)
        g = fn.fn.__globals__
        for n in fn.fn.__code__.co_names:
            if isinstance(g.get(n), JITFunction):
                todo.append(g[n])
    return seen


def check_complete(entries=None) -> list[str]:
    """Names of triton.jit functions in the package that no inventory entry compiles."""
    entries = inventory() if entries is None else entries
    missing = _jit_functions_in_package() - _reachable(entries)
    return sorted(f"{f.fn.__module__}.{f.fn.__name__}" for f in missing)


def _sass_report(cubin: bytes) -> dict:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        sass = subprocess.run([os.path.join(_BIN, "cuobjdump"), "--dump-sass", path],
                              capture_output=True, text=True, check=True).stdout
        res = subprocess.run([os.path.join(_BIN, "cuobjdump"), "--dump-resource-usage", path],
                             capture_output=True, text=True, check=True).stdout

    def field_of(key):
        m = re.search(rf"\b{key}:(\d+)", res)
        return int(m.group(1)) if m else 0

    def widest(op):
        # e.g. LDG.E.128 (16 B), LDG.E.64, LDG.E (32-bit), LDG.E.U16 (bf16/fp16 scalar)
        widths = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}
        bits = [max([widths.get(part, 0) for part in ins.split(".")] + [0]) or 32
                for ins in re.findall(rf"\b{op}(?:\.[A-Z0-9_]+)+", sass)]
        return max(bits, default=0)

    return {"regs": field_of("REG"), "local": field_of("LOCAL"), "stack": field_of("STACK"),
            "shared": field_of("SHARED"), "ldg_bits": widest("LDG"), "stg_bits": widest("STG"),
            "ldg128": len(re.findall(r"\bLDG\.E\.128\b", sass)), "stg128": len(re.findall(r"\bSTG\.E\.128\b", sass))}


def compile_entry(e: Entry, arch: int) -> dict:
    t0 = time.perf_counter()
    row = {"name": e.name, "arch": arch}
    try:
        src = ASTSource(fn=e.fn, signature=e.signature, constexprs=e.constexprs)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=e.options)
        row.update(ok=True, **_sass_report(k.asm["cubin"]))
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
        if e.vector_check and not (row["ldg128"] and row["stg128"]):
            problems.append(f"no 128-bit loads/stores (widest LDG {row['ldg_bits']}, STG {row['stg_bits']})")
    row["problems"] = problems
    return row


_ENTRIES: list = []


def _compile_job(job):
    i, arch = job
    return compile_entry(_ENTRIES[i], arch)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--check", action="store_true", help="exit 1 on any compile failure, spill or narrow access")
    ap.add_argument("--json", help="write all rows to this file")
    ap.add_argument("--only", help="compile only entries whose name contains this")
    ap.add_argument("--list", action="store_true", help="print the inventory and the completeness check only")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
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
    print(f"{'kernel':60s} {'sm':>3s} {'ok':>3s} {'regs':>4s} {'spill':>5s} {'ldg':>4s} {'stg':>4s}  problems")
    jobs = [(i, arch) for i in range(len(entries)) for arch in args.arch]
    with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
        # fork: workers inherit the inventory (JIT functions do not pickle); each job is an index
        for (i, arch), r in zip(jobs, pool.imap(_compile_job, jobs)):
            e = entries[i]
            rows.append(r)
            print(f"{e.name[:60]:60s} {arch:3d} {'yes' if r['ok'] else 'NO':>3s} {r.get('regs', 0):4d} "
                  f"{r.get('local', 0):5d} {r.get('ldg_bits', 0):4d} {r.get('stg_bits', 0):4d}  "
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
