"""How the fused kernels see an optimizer's tensors: local shards, real views, and copies of what they cannot walk
in place (any layout torch's optimizers take works on the fused path, never with wrong numbers)."""
from __future__ import annotations

import operator

import torch

from ._tensors import any_dtensor, as_real, dense, local, same_order
from .kernels.quant import CODE_DTYPE, INT8

_IS_CONTIGUOUS = torch.Tensor.is_contiguous


class KernelTensors:
    """FusedOptimizer's tensor preparation for its kernels.

    kernel_layout: what the fused kernels can walk in place. "storage" (element-wise kernels): any dense layout
    (contiguous, channels_last, transposed) that the param's grad and states share; "rows": the same, with dim 0
    outermost (per-row statistics: channels_last conv weights qualify); "contiguous": the kernels read logical
    structure; "flat" (LBFGS): gathered into flat vectors. Other tensors go through copies (``_fit_layouts``).
    """

    kernel_layout = "storage"

    def _kernel_tensors(self, params, grads, states, keys, grad_scale=None, extra=()):
        """(params, grads, one column [st[k] of every param] per state key, write-backs) as the kernels take them:
        only addresses, sizes and dtypes are read, so no per-tensor views in the common case (at thousands of
        tensors, per-tensor Python work is the step's host cost). FSDP2 / DTensor: the local shards (an element-wise
        update of the shard is the update of the whole tensor); complex: the real views. A tensor whose layout the
        kernels cannot walk is replaced by a copy they can (``_fit_layouts``): after the launch, ``write_back``.
        ``extra``: more columns of param-shaped tensors or None (master copies), returned after the states'."""
        columns = [list(map(operator.itemgetter(k), states)) for k in keys]
        if any_dtensor(params):
            params, grads = [local(p) for p in params], [local(g) for g in grads]
            columns = [[local(s) for s in col] for col in columns]
            extra = [[local(s) for s in col] for col in extra]
        back = ()
        if not (all(map(_IS_CONTIGUOUS, params)) and all(map(_IS_CONTIGUOUS, grads))
                and all(all(map(_IS_CONTIGUOUS, col)) for col in columns)
                and all(s is None or s.is_contiguous() for col in extra for s in col)):
            params, grads, columns, back = self._fit_layouts(params, grads, [*columns, *extra], grad_scale is not None)
        else:
            columns = [*columns, *extra]
        if any(map(torch.Tensor.is_complex, params)):
            params, grads = [as_real(p) for p in params], [as_real(g) for g in grads]
            columns = [[as_real(s) for s in col] for col in columns]
        return params, grads, columns, back

    def _kernel_tensors_with_masters(self, params, grads, states, keys, grad_scale=None):
        """_kernel_tensors with the master slot of each param (PrecisionOptions._masters) as one more column:
        (params, grads, columns, masters or None, write-backs)."""
        masters = self._masters(states)
        params, grads, columns, back = self._kernel_tensors(params, grads, states, keys, grad_scale,
                                                            extra=[masters] if masters else ())
        if masters:
            *columns, masters = columns
        return params, grads, columns, masters, back

    def _fit_layouts(self, params, grads, columns, grad_written: bool):
        """The kernels' view of tensors that are not all contiguous (``kernel_layout`` says what they can walk).
        A param the kernels cannot walk, and a grad or state (of the param's shape) not laid out like the param the
        kernels see, is replaced by a copy that is: (params, grads, columns, write-backs), the write-backs being
        (tensor, copy) pairs to copy back after the launch (the param, its states, and the grad when the kernels
        write the unscaled grad to it). Each copy costs a read and a write of the tensor per step (twice for a param
        or state: in and back)."""
        params, grads, columns = list(params), list(grads), [list(col) for col in columns]
        back = []
        for i, p in enumerate(params):
            if not self._walkable(p):
                like = self._walk_layout(p, [col[i] for col in columns])
                params[i] = p.contiguous() if like is None else torch.empty_like(like, dtype=p.dtype).copy_(p)
                back.append((p, params[i]))
            like = params[i]
            if grads[i].layout == torch.strided and not (dense(grads[i]) and same_order(grads[i], like)):
                g, grads[i] = grads[i], torch.empty_like(like, dtype=grads[i].dtype).copy_(grads[i])
                if grad_written:
                    back.append((g, grads[i]))
            for col in columns:
                s = col[i]
                if s is not None and s.shape == p.shape and not (dense(s) and same_order(s, like)):
                    col[i] = torch.empty_like(like, dtype=s.dtype).copy_(s)
                    back.append((s, col[i]))
        return params, grads, columns, back

    def _walk_layout(self, p, states):
        """Where a param the kernels cannot walk is copied to: the layout of its first state (of its shape) they
        can walk, so that state stays in place (int8 codes must: their block scales follow their storage order);
        None: contiguous."""
        return next((s for s in states if s is not None and s.shape == p.shape and dense(s) and self._walkable(s)),
                    None)

    def _codes_fit(self, params) -> bool:
        """Whether the kernels walk the params' int8 codes where they are (a relaid copy of the codes would pair
        them with other blocks' scales: such a group takes the reference path)."""
        return self.state_dtype != INT8 or all(map(self._codes_in_place, params))

    def _codes_in_place(self, p) -> bool:
        states = [v for v in self.state[p].values() if isinstance(v, torch.Tensor) and v.shape == p.shape]
        like = p if self._walkable(p) else self._walk_layout(p, states)
        return all(s.dtype != CODE_DTYPE or (like is not None and dense(s) and same_order(s, like)) for s in states)

    def _walkable(self, p) -> bool:
        """Whether the kernels can update p in place (see ``kernel_layout``)."""
        if self.kernel_layout == "contiguous":
            return p.is_contiguous()
        if not dense(p):
            return False
        # rows: dim 0 outermost, so each row is one block of storage (channels_last conv weights are)
        return self.kernel_layout == "storage" or p.dim() < 2 or p.shape[0] <= 1 or (
            p.stride(0) * p.shape[0] == p.numel())

    @staticmethod
    def _write_back(back) -> None:
        """After a launch on copies (``_fit_layouts``): copy them back."""
        for dst, src in back:
            dst.copy_(src)
