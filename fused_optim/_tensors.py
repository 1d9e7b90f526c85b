"""Helpers every optimizer module shares: hyper-parameter checks (torch's wording), scalar reads, and the small
tensor utilities of states (real views, DTensor shards, device scalars, fresh buffers, checkpoint dtypes)."""
from __future__ import annotations

import math
import operator
from typing import Callable

import torch
from torch.optim import Optimizer


def check(cond: bool, msg: str) -> None:
    """Raise ValueError(msg) unless cond. NaN fails every comparison, so `check(0 <= x, ...)` rejects NaN too."""
    if not cond:
        raise ValueError(msg)


def check_nonneg(**kw) -> None:
    for name, value in kw.items():
        v = value.item() if isinstance(value, torch.Tensor) else value
        check(isinstance(v, (int, float)) and 0.0 <= v < math.inf, f"Invalid {name} value: {value}")


def check_betas(betas, *, allow_one: bool = False, names=("betas[0]", "betas[1]")) -> None:
    check(isinstance(betas, (tuple, list)) and len(betas) == len(names),
          f"Invalid betas: {betas!r} (expected a pair of floats)")
    for name, b in zip(names, betas):
        b = b.item() if isinstance(b, torch.Tensor) else b
        ok = 0.0 <= b <= 1.0 if allow_one else 0.0 <= b < 1.0
        check(ok, f"Invalid beta parameter at index {names.index(name)}: {b}")


def scalar(x) -> float:
    """A hyper-parameter as a Python float (tensor hyper-parameters are read once, on the host)."""
    return x.item() if isinstance(x, torch.Tensor) else float(x)


def as_real(t: torch.Tensor | None):
    return torch.view_as_real(t) if t is not None and t.is_complex() else t


LOW_PRECISION = (torch.bfloat16, torch.float16)


def stochastic_round_bf16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 with stochastic rounding: add 16 random low bits, then truncate (unbiased)."""
    bits = x.float().contiguous().view(torch.int32)
    bits = bits + torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device)
    return ((bits >> 16) << 16).view(torch.float32).to(torch.bfloat16)


def is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def any_dtensor(tensors) -> bool:
    """Whether any of the tensors is a DTensor (FSDP2): one look at the set of their types."""
    return any(cls.__name__ == "DTensor" for cls in set(map(type, tensors)))


def local(t):
    """The local shard of a DTensor (FSDP2), else the tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def device_index(device: torch.device) -> int:
    """What Tensor.get_device() returns for a tensor on `device` (-1 on CPU): comparing it is cheaper than .device."""
    return device.index if device.type == "cuda" else -1


def scalars_on_device(states, keys, device, keep_f64: bool = True) -> None:
    """Make per-tensor scalar states 0-d tensors on `device`, in place: kernels read them from device memory (torch
    keeps them on CPU by default, timm as Python numbers). float32, but float64 states stay float64 (``keep_f64``;
    torch's checkpoint load makes them so for float64 params, and its math then runs in float64): the multi-tensor
    apply reads either. The steady state is one whole-list check."""
    index = device_index(device)
    ok = {torch.float32, torch.float64} if keep_f64 else {torch.float32}
    for k in keys:
        col = list(map(operator.itemgetter(k), states))
        if set(map(type, col)) <= _TENSOR_TYPES and set(map(torch.Tensor.get_device, col)) == {index} and set(
                map(_DTYPE, col)) <= ok:
            continue
        for st, v in zip(states, col):
            if not isinstance(v, torch.Tensor) or v.get_device() != index or v.dtype not in ok:
                dt = v.dtype if isinstance(v, torch.Tensor) and v.dtype in ok else torch.float32
                st[k] = torch.as_tensor(v, dtype=dt).to(device)


def numbers_as_anchor(sd: dict, kinds: dict) -> dict:
    """A state dict whose entries ``kinds`` names (key -> int / float) hold Python numbers where they are 0-d
    tensors (per-param states and group entries; the live state is not touched). The anchor's types in a
    checkpoint let it load into either path and into the anchor, DCP's loader included (it requires the
    types to agree); the fused path moves them back to the device at its next step. One host sync per value, at
    checkpoint time only."""
    if kinds:
        for i, st in sd["state"].items():
            if any(isinstance(st.get(k), torch.Tensor) for k in kinds):
                sd["state"][i] = {k: kinds[k](v.item()) if k in kinds and isinstance(v, torch.Tensor) else v
                                  for k, v in st.items()}
        for group in sd["param_groups"]:
            for k in kinds.keys() & group.keys():
                if isinstance(group[k], torch.Tensor):
                    group[k] = kinds[k](group[k].item())
    return sd


_TENSOR_TYPES = {torch.Tensor}
GRAD = operator.attrgetter("grad")
IS_SPARSE = operator.attrgetter("is_sparse")
_DTYPE = operator.attrgetter("dtype")


def _spans(t: torch.Tensor):
    """(stride, size) of t's dims of size > 1, innermost first."""
    return sorted((st, n) for st, n in zip(t.stride(), t.shape) if n != 1)


def dense(t: torch.Tensor) -> bool:
    """Every element of t has its own place in one gap-free block of storage from ``t.data_ptr()`` (torch's
    non-overlapping and dense: contiguous, channels_last, any permutation): a kernel may walk its ``numel()``
    elements in storage order."""
    if t.is_contiguous():
        return True
    extent = 1
    for st, n in _spans(t):
        if st != extent:
            return False
        extent *= n
    return True


def overlapping(t: torch.Tensor) -> bool:
    """Some elements of t may share memory (an expanded, stride-0 tensor): it cannot be written in place.
    Conservative: a layout too odd to tell counts as overlapping."""
    extent = 0
    for st, n in _spans(t):
        if st <= extent:
            return True
        extent += st * (n - 1)
    return False


def writable_grads(params, grads) -> list:
    """The grads, each one whose elements share memory (an expanded grad: no in-place unscaling or clipping)
    replaced by a dense copy, which becomes its param's ``.grad``."""
    if all(map(torch.Tensor.is_contiguous, grads)):
        return grads
    out = []
    for p, g in zip(params, grads):
        if g.layout == torch.strided and overlapping(g):
            g = p.grad = g.contiguous()
        out.append(g)
    return out


def same_order(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a and b (of one shape) lay their elements out in the same storage order (size-1 dims do not count)."""
    return a.stride() == b.stride() or all(x == y for x, y, n in zip(a.stride(), b.stride(), a.shape) if n != 1)


def like_param(v, p: torch.Tensor):
    """A state value laid out like its (dense) param, as torch creates them: a loaded checkpoint keeps the saved
    strides, and the fused kernels walk a param and its states in one storage order. Else v itself."""
    if (isinstance(v, torch.Tensor) and v.shape == p.shape and v.layout == torch.strided and not is_dtensor(p)
            and not (dense(v) and same_order(v, p)) and dense(p)):
        return torch.empty_like(p, dtype=v.dtype).copy_(v)
    return v


def zeros_like(p: torch.Tensor) -> torch.Tensor:
    """A fresh element-wise state buffer, laid out like the param (as torch's optimizers make them)."""
    return torch.zeros_like(p, memory_format=torch.preserve_format)


def new_step(p: torch.Tensor, group: dict) -> torch.Tensor:
    """torch's per-param step counter: float32 0-d, on CPU unless capturable/fused (then on the param's device)."""
    on_dev = group.get("capturable") or group.get("fused")
    return torch.zeros((), dtype=torch.float32, device=p.device if on_dev else "cpu")


def restore_state_dtypes(opt: Optimizer, state_dict: dict, dtypes_of: Callable) -> None:
    """Call after ``Optimizer.load_state_dict``: torch casts every floating state but ``step`` to its param's dtype;
    timm keeps some in another dtype (fp32 moments of bf16 params, NvNovoGrad's default-dtype norms).
    ``dtypes_of(group, p)`` maps state keys to the dtype to keep (None: leave torch's cast); those are re-read from
    the saved values (copies, never aliases of the checkpoint)."""
    for group, saved_group in zip(opt.param_groups, state_dict["param_groups"]):
        for p, pid in zip(group["params"], saved_group["params"]):
            saved = state_dict["state"].get(pid, {})
            for key, dtype in dtypes_of(group, p).items():
                if dtype is not None and isinstance(saved.get(key), torch.Tensor):
                    opt.state[p][key] = like_param(saved[key].to(device=p.device, dtype=dtype, copy=True), p)


def keep_replaced(states, work_states, before) -> None:
    """Copy into ``states`` the entries a reference replaced (rather than mutated in place) in ``work_states``."""
    for st, ws, old in zip(states, work_states, before):
        for k, v in ws.items():
            if old.get(k) is not v:
                st[k] = v
