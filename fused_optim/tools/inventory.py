"""The AOT inventory: every Triton kernel specialization the package launches, derived from the code (see
fused_optim/tools/aot.py, which compiles it).
"""
from __future__ import annotations

import importlib
import inspect
import itertools
import pkgutil
import sys
from dataclasses import dataclass, field

import torch
from triton.runtime.jit import JITFunction

import fused_optim
from fused_optim.kernels import multi_tensor as mt, quant, runtime

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
    return 0, sum(1 << (mt.SCALAR_F64_FIRST + k) for k in range(1, nt))


INT8_AOT = ("adam", "adamw", "sgd", "rmsprop", "muon")  # state_dtype="int8" (QUANT): a few, not every option


def _int8_entries(sig) -> list[Entry]:
    """int8 states of INT8_AOT's default and all-options rules: fp32 params, and bf16 params with remainders (each
    launch of a step that carries states, with the dtypes its aot_launch gives)."""
    out = []
    for name in INT8_AOT:
        cls = fused_optim.REGISTRY[name]
        probe = cls([torch.nn.Parameter(torch.ones(2, 2))], fused=False, **({"lr": 0.1} if _lr_required(cls) else {}))
        variants = option_variants(cls)
        subs = getattr(cls, "kernel_subvariants", (None,))
        for variant, sub in itertools.product((variants[0], max(variants, key=len)), subs):  # defaults, all options
            rule, keys, skeys = probe._kernel_rule({**probe.param_groups[0], **variant}, sub)
            if not keys:  # no states (SGD without momentum, Muon's update launch): nothing to quantize
                continue
            unsigned = quant.unsigned_slots(keys, cls.nonnegative_states)
            label = (",".join(f"{k}={v}" for k, v in variant.items()) or "default") + (
                f",variant={sub}" if sub is not None else "")  # (as the other entries name a subvariant)
            for dts, master in (((torch.float32,) * 2, mt.NO_MASTER), ((BF16,) * 2, mt.REMAINDER)):
                if hasattr(cls, "aot_launch"):  # (Muon's momentum launch: the bf16 stack, no master)
                    (*dts, _), _, master, _ = cls.aot_launch(sub, (*dts, torch.uint8), False, master, False)
                    master = master or mt.NO_MASTER
                cx = mt.constexprs(rule, (*dts, torch.uint8), len(keys), len(skeys), lr_tensor=False, has_scale=False,
                                   has_inf=False, aligned=True, master=master, quant=quant.quant_bits(unsigned))
                dname = "/".join(map(str, dts[:1] if len(set(dts)) == 1 else dts))
                out.append(Entry(f"{cls.__name__}[{label}] {dname} int8 states{_MASTER_NAMES.get(master, '')}"
                                 .replace("torch.", ""), mt.multi_tensor_apply_kernel, sig, cx,
                                 runtime.compile_options(), vector_check=True))
    return out


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
    entries += _int8_entries(sig)
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
