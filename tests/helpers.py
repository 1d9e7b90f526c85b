"""Shared comparison helpers for the generic tests."""
from __future__ import annotations

import torch


def assert_close(actual, expected, rtol, atol, what=""):
    if isinstance(expected, torch.Tensor):
        actual = torch.as_tensor(actual)
        assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
        a = actual.detach().to("cpu", torch.float64)
        e = expected.detach().to("cpu", torch.float64)
        if e.is_complex() or a.is_complex():
            a, e = torch.view_as_real(a.to(torch.complex128)), torch.view_as_real(e.to(torch.complex128))
        assert torch.isfinite(a).all() == torch.isfinite(e).all(), f"{what}: non-finite values differ"
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{what}: length {len(actual)} != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, rtol, atol, f"{what}[{i}]")
    elif isinstance(expected, float):
        assert abs(float(actual) - expected) <= atol + rtol * abs(expected), f"{what}: {actual} != {expected}"
    else:
        assert actual == expected, f"{what}: {actual!r} != {expected!r}"


def assert_states_close(opt_a, params_a, opt_b, params_b, rtol, atol):
    """Params and every state entry equal (state keys too), param by param."""
    for i, (pa, pb) in enumerate(zip(params_a, params_b)):
        assert_close(pa, pb, rtol, atol, f"param {i}")
        sa, sb = opt_a.state.get(pa, {}), opt_b.state.get(pb, {})
        assert set(sa) == set(sb), f"param {i}: state keys {sorted(sa)} != {sorted(sb)}"
        for k in sb:
            assert_close(sa[k], sb[k], rtol, atol, f"param {i} state {k!r}")


def snapshot(opt, params):
    """Deep copy of params and states (to check that something changed nothing)."""
    return ([p.detach().clone() for p in params],
            [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state.get(p, {}).items()}
             for p in params])


def assert_unchanged(opt, params, snap):
    ps, sts = snap
    for p, q in zip(params, ps):
        assert torch.equal(p.detach(), q), "a param changed"
    for p, st in zip(params, sts):
        now = opt.state.get(p, {})
        assert set(now) == set(st), "state keys changed"
        for k, v in st.items():
            assert (torch.equal(now[k], v) if isinstance(v, torch.Tensor) else now[k] == v), f"state {k} changed"


def train_mlp(make_opt, device, scaler=None, steps=6, inf_at=None, dims=(6, 16), check_unscaled=False):
    """A small MLP trained from a fixed start by make_opt(params), optionally through a GradScaler; grad [0, 0] of
    the first layer is inf at step inf_at. check_unscaled: after each finite scaled step, p.grad must hold the
    unscaled grad (the fused kernels write it back). Returns (model, opt, param snapshots before each step)."""
    torch.manual_seed(0)
    n_in, hidden = dims
    model = torch.nn.Sequential(torch.nn.Linear(n_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)).to(device)
    opt = make_opt(model.parameters())
    x, y = torch.randn(32, n_in, device=device), torch.randn(32, 1, device=device)
    snaps = []
    for i in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        (scaler.scale(loss) if scaler else loss).backward()
        if i == inf_at:
            model[0].weight.grad[0, 0] = float("inf")
        snaps.append([p.detach().clone() for p in model.parameters()])
        if scaler:
            scale = scaler.get_scale()
            scaled = [p.grad.clone() for p in model.parameters()]
            scaler.step(opt)
            if check_unscaled and i != inf_at:
                for p, g in zip(model.parameters(), scaled):
                    torch.testing.assert_close(p.grad, g / scale, rtol=1e-6, atol=0)
            scaler.update()
        else:
            opt.step()
    return model, opt, snaps


def kernel_tables(opt):
    """Every device table a fused optimizer has cached (one per param group and dtype combination)."""
    return [t for cache in opt._kernel_caches.values() for t in getattr(cache, "tables", {}).values()]


def assert_kernels_idle(opt):
    """Between steps every cross-program counter is back to zero: per-tensor / per-block counters and, for
    persistent launches, the grid barrier's arrivals and its sticky gave-up flag."""
    for tab in kernel_tables(opt):
        if getattr(tab, "barrier", None) is not None:
            assert tab.barrier.words.tolist() == [0, 0]
        assert not tab.counters.any()
