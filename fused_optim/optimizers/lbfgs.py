"""L-BFGS with an optional strong-Wolfe line search (anchor: torch.optim.LBFGS): the class and its step. Reference
path: host-driven like torch, same op order. Fused path: a ring-buffer history (lbfgs_history.py), one launch per
direction (kernels/lbfgs.py), host decisions on values fetched once per decision point. Notes: "LBFGS" in
fused_optim/kernels/README.md."""
from __future__ import annotations

import math

import torch

from .._base import FusedOptimizer
from .._tensors import check, check_nonneg
from .._registry import register
from ..kernels import runtime
from .lbfgs_history import DeviceHistory, snapshot
from .lbfgs_search import (add_flat, as_state_value, flat_dtype, gather_flat_grad, host_scalar, quiet_host_math,
                           real_views, remember, strong_wolfe, two_loop)

# How the fused path computes a direction: "triton" (one launch of the direction kernel) or "torch" (the same
# contract in torch ops: a cross-check, and fast CPU tests where the interpreter would be slow).
DIRECTION = "triton"

_CARRIED = ("d", "t", "old_dirs", "old_stps", "ro", "H_diag", "prev_flat_grad", "prev_loss")


def _lr_of(group):
    """lr as torch's LBFGS uses it: a tensor lr stays a (0-d) tensor, so t = lr is one too (its dtype rounds the
    line search's arithmetic, and the state keeps it)."""
    lr = group["lr"]
    return lr.squeeze() if isinstance(lr, torch.Tensor) and lr.dim() != 0 else lr


@register
class LBFGS(FusedOptimizer):
    """L-BFGS: quasi-Newton steps from the last ``history_size`` curvature pairs (two-loop recursion), with an
    optional strong-Wolfe line search. Anchor: torch.optim.LBFGS (same signature, state, closure calls and
    trajectory). ``step(closure)`` needs a closure that zeroes the grads, recomputes the loss, calls backward and
    returns the loss; one param group only. master_weights, stochastic_rounding and max_grad_norm are refused
    (the line search and the curvature pairs need the params' own precision and the true gradient).

    ``fused=True`` (``None``: when every param is on CUDA): one launch per direction update, and device -> host
    syncs only at the algorithm's decisions (Note [LBFGS host syncs]; ``host_syncs`` counts them). float32 and
    float64 params (complex as real pairs). ``device_history``: the fused path's DeviceHistory (None until then).
    """
    requires_closure = True
    elementwise = False  # dot products over the whole flat vector
    shardable = False  # its line search and history are not written for DTensor shards
    supports_precision_options = False  # line search and history assume the params' own precision
    supports_max_grad_norm = False  # the line search and the curvature pairs need the true gradient
    scalar_keys = ()
    kernel_layout = "flat"  # the flat vectors gather the grads in logical order
    _step_supports_amp_scaling = False
    kernel_variants = ()  # no multi-tensor rule: kernels/lbfgs.py's aot_kernels() lists the direction kernel
    host_syncs = 0        # device -> host transfers made by the fused path (tests count them)
    device_history = None

    def __init__(self, params, lr=1, max_iter=20, max_eval=None, tolerance_grad=1e-7, tolerance_change=1e-9,
                 history_size=100, line_search_fn=None, *, fused=None):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if max_eval is None:
            max_eval = max_iter * 5 // 4
        defaults = dict(lr=lr, max_iter=max_iter, max_eval=max_eval, tolerance_grad=tolerance_grad,
                        tolerance_change=tolerance_change, history_size=history_size, line_search_fn=line_search_fn)
        super().__init__(params, defaults, fused=fused)

    def add_param_group(self, param_group):
        if self.param_groups:
            raise ValueError("LBFGS doesn't support per-parameter options (parameter groups)")
        super().add_param_group(param_group)

    def _validate(self, group):
        check_nonneg(lr=group["lr"], tolerance_grad=group["tolerance_grad"],
                     tolerance_change=group["tolerance_change"])
        for key in ("max_iter", "max_eval"):
            v = group[key]
            check(isinstance(v, (int, float)) and not isinstance(v, bool) and 1 <= v < math.inf,
                  f"Invalid {key} value: {v}")
        h = group["history_size"]
        check(isinstance(h, int) and not isinstance(h, bool) and h >= 1, f"Invalid history_size value: {h}")
        ls = group["line_search_fn"]
        check(ls in (None, "strong_wolfe"), f"Invalid line_search_fn value: {ls!r} (None or 'strong_wolfe')")

    # ---- the step -----------------------------------------------------------------------------------------------
    @classmethod
    def _has_kernel(cls) -> bool:
        return runtime.available()

    def _use_kernel(self, group, params) -> bool:
        if group.get("fused") is None and flat_dtype(params) not in (torch.float32, torch.float64):
            return False
        return super()._use_kernel(group, params)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is None:
            raise RuntimeError("LBFGS.step() requires a closure that re-evaluates the loss (and its grads)")
        group, closure = self.param_groups[0], torch.enable_grad()(closure)
        self._check_shards([(group, group["params"], None)])
        if self._use_kernel(group, group["params"]):
            return self._fused_step(group, closure)
        self.device_history = None  # the reference path edits the state's lists: the buffers no longer mirror them
        return self._reference_step(group, closure)

    def state_dict(self):
        sd = super().state_dict()
        if self.device_history is not None:
            sd["state"] = snapshot(sd["state"])
        return sd

    def _begin(self, group, closure):
        """The step's start: the state (torch keeps its global state under the first param, so load_state_dict casts
        it with that param), the first evaluation and its flat grad."""
        state = self.state[group["params"][0]]
        state.setdefault("func_evals", 0)
        state.setdefault("n_iter", 0)
        orig_loss = closure()
        state["func_evals"] += 1
        return state, orig_loss, gather_flat_grad(group["params"])

    def _reference_step(self, group, closure):
        params, lr, history_size = group["params"], _lr_of(group), group["history_size"]
        max_iter, max_eval = group["max_iter"], group["max_eval"]
        tol_grad, tol_change = group["tolerance_grad"], group["tolerance_change"]
        state, orig_loss, flat_grad = self._begin(group, closure)
        loss = float(orig_loss)
        evals = 1
        if flat_grad.abs().max() <= tol_grad:
            return orig_loss  # already optimal: nothing else is recorded

        st = {k: state.get(k) for k in _CARRIED}
        for n_iter in range(1, max_iter + 1):
            state["n_iter"] += 1

            # -- direction
            if state["n_iter"] == 1:
                st.update(d=flat_grad.neg(), old_dirs=[], old_stps=[], ro=[], H_diag=1)
            else:
                y = flat_grad.sub(st["prev_flat_grad"])
                s = st["d"].mul(st["t"])
                ys = y.dot(s)
                if ys > 1e-10:  # keep the pair only if it has positive curvature
                    remember(st, y, s, ys, history_size)
                    st["H_diag"] = ys / y.dot(y)
                al = state.setdefault("al", [None] * history_size)
                st["d"] = two_loop(flat_grad, st["old_dirs"], st["old_stps"], st["ro"], st["H_diag"], al)
            d = st["d"]
            if st["prev_flat_grad"] is None:
                st["prev_flat_grad"] = flat_grad.clone(memory_format=torch.contiguous_format)
            else:
                st["prev_flat_grad"].copy_(flat_grad)
            st["prev_loss"] = prev_loss = loss

            # -- step length
            t = min(1.0, 1.0 / flat_grad.abs().sum()) * lr if state["n_iter"] == 1 else lr
            gtd = flat_grad.dot(d)
            if gtd > -tol_change:  # not a descent direction (to tolerance)
                st["t"] = t
                break
            n_ls = 0
            if group["line_search_fn"] == "strong_wolfe":
                x0 = [p.clone(memory_format=torch.contiguous_format) for p in params]

                def evaluate(t_try):
                    add_flat(params, t_try, d)
                    f = float(closure())
                    g = gather_flat_grad(params)
                    for p, p0 in zip(params, x0):
                        p.copy_(p0)
                    return f, g, g.dot(d)

                loss, flat_grad, t, n_ls = strong_wolfe(evaluate, t, d.abs().max(), loss, flat_grad, gtd,
                                                        max_ls=max_eval - evals)
                add_flat(params, t, d)
                opt_cond = flat_grad.abs().max() <= tol_grad
            else:
                add_flat(params, t, d)
                opt_cond = False
                if n_iter != max_iter:  # the last iteration's loss is never looked at: skip that evaluation
                    loss = float(closure())
                    flat_grad = gather_flat_grad(params)
                    opt_cond = flat_grad.abs().max() <= tol_grad
                    n_ls = 1
            st["t"] = t
            evals += n_ls
            state["func_evals"] += n_ls

            # -- stopping tests
            if n_iter == max_iter or evals >= max_eval or opt_cond:
                break
            if d.mul(t).abs().max() <= tol_change or abs(loss - prev_loss) < tol_change:
                break

        state.update(st)
        return orig_loss

    # ---- the fused path ---------------------------------------------------------------------------------------------
    def _fetch(self, device, *values):
        """The values (0-d tensors on ``device``, or host numbers) as Python floats, in ONE device -> host transfer."""
        on_dev = [v.detach().reshape(1).to(torch.float64) for v in values
                  if isinstance(v, torch.Tensor) and v.device == device]
        host = iter(torch.cat(on_dev).tolist() if on_dev else ())
        self.host_syncs += 1
        return [next(host) if isinstance(v, torch.Tensor) and v.device == device else float(v) for v in values]

    def _direction(self, dev, g, t, *extra):
        """The next direction from g and t; returns extra values + its (kept, g.d, max|d|), in one transfer."""
        dev.direction(g, t, kernel=DIRECTION == "triton")
        *vals, failed = self._fetch(dev.device, *extra, *dev.results())
        if failed:
            dev.barrier.words.zero_()
            raise RuntimeError("LBFGS: the direction kernel's grid barrier timed out (were all its programs resident "
                               "on the GPU?)")
        return vals

    def _fused_step(self, group, closure):
        params = group["params"]
        if flat_dtype(params) not in (torch.float32, torch.float64):
            raise RuntimeError(f"LBFGS: fused=True supports float32 and float64 params, got {flat_dtype(params)}")
        lr_t = _lr_of(group)  # torch's lr object (what state["t"] holds after a plain iteration)
        lr = host_scalar(lr_t.dtype)(lr_t.item()) if isinstance(lr_t, torch.Tensor) else lr_t
        max_iter, max_eval = group["max_iter"], group["max_eval"]
        tol_grad, tol_change = group["tolerance_grad"], group["tolerance_change"]
        wolfe = group["line_search_fn"] == "strong_wolfe"
        reals = real_views(params)
        state, orig_loss, g = self._begin(group, closure)
        evals = 1
        dev = self.device_history = DeviceHistory.for_state(self.device_history, state, g, group["history_size"])
        hs = host_scalar(g.dtype)  # host stand-in of torch's 0-d tensors in g's dtype
        dev_ = dev.device
        optimal = g.abs().max() <= tol_grad
        if state["n_iter"] == 0:  # torch's first iteration: d = -g, t = min(1, 1 / |g|_1) * lr
            d_new = dev.fresh(g)
            inv = 1.0 / g.abs().sum()
            loss, opt, gtd, dmax, inv_h, t_first = self._fetch(
                dev_, orig_loss, optimal, g.dot(d_new), d_new.abs().max(), inv, inv * lr_t)
            t_first = host_scalar(torch.result_type(inv, lr_t))(t_first)
            kept = None
        else:
            loss, opt, kept, gtd, dmax = self._direction(dev, g, state["t"], orig_loss, optimal)
        if opt:
            return orig_loss  # already optimal: nothing else is recorded (the computed direction is dropped)

        for n_iter in range(1, max_iter + 1):
            state["n_iter"] += 1
            dev.commit(kept)
            views = dev.views(dev.cur, reals)
            prev_loss = loss
            # torch's min(1.0, inv) * lr is a 0-d tensor when inv < 1
            t = (t_first if inv_h < 1.0 else 1.0 * lr) if state["n_iter"] == 1 else lr
            if hs(gtd) > hs(-tol_change):  # not a descent direction (to tolerance)
                break
            if wolfe:
                if dev.x0 is None:
                    dev.x0 = [torch.empty_like(r) for r in reals]
                torch._foreach_copy_(dev.x0, reals)
                d = dev.d[dev.cur]

                def evaluate(t_try):
                    torch._foreach_add_(reals, views, alpha=float(t_try))
                    f = closure()
                    g_try = gather_flat_grad(params)
                    torch._foreach_copy_(reals, dev.x0)
                    f, slope, opt_try = self._fetch(dev_, f, g_try.dot(d), g_try.abs().max() <= tol_grad)
                    return f, (g_try, opt_try), hs(slope)

                with quiet_host_math():
                    loss, (g, opt), t, n_ls = strong_wolfe(evaluate, t, hs(dmax), loss, (g, False), hs(gtd),
                                                           max_ls=max_eval - evals)
                torch._foreach_add_(reals, views, alpha=float(t))
            else:
                torch._foreach_add_(reals, views, alpha=float(t))
                n_ls, opt = 0, False
                if n_iter != max_iter:  # the last iteration's loss is never looked at: skip that evaluation
                    new_loss = closure()
                    g = gather_flat_grad(params)
                    n_ls = 1
            evals += n_ls
            state["func_evals"] += n_ls

            # -- stopping tests (torch's order; all of them stop, so only whether one holds matters)
            if n_iter == max_iter or evals >= max_eval:
                break
            small_step = hs(hs(dmax) * hs(t)) <= hs(tol_change)  # d.mul(t).abs().max() <= tolerance_change
            if not wolfe:
                # the next direction, speculatively: its tests ride on this transfer; a stop below discards it
                loss, opt, kept, gtd_next, dmax_next = self._direction(dev, g, t, new_loss, g.abs().max() <= tol_grad)
            if opt or small_step or abs(loss - prev_loss) < tol_change:
                break
            if wolfe:
                kept, gtd, dmax = self._direction(dev, g, t)
            else:
                gtd, dmax = gtd_next, dmax_next

        dev.materialize(state)
        state["t"] = lr_t if t is lr else as_state_value(t, dev_)
        state["prev_loss"] = prev_loss
        return orig_loss
