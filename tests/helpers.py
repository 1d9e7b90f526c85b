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


def twin_groups(cls, cfg, group2, shapes, shapes_2, device):
    """A fused and a reference cls (options cfg) on the same random params (from a generator seeded 0) in two
    groups: shapes, then shapes_2 with group2's options. Returns (fused, its params, ref, its params, the generator)."""
    gen = torch.Generator().manual_seed(0)
    pa = [torch.randn(s, generator=gen).to(device) for s in shapes]
    qa = [torch.randn(s, generator=gen).to(device) for s in shapes_2]
    pb, qb = [p.clone() for p in pa], [q.clone() for q in qa]
    fused = cls([{"params": pa}, {"params": qa, **group2}], fused=True, **cfg)
    ref = cls([{"params": pb}, {"params": qb, **group2}], fused=False, **cfg)
    return fused, pa + qa, ref, pb + qb, gen


def twin_grads(params_a, params_b, gen=None):
    """The same random grads on two lists of params (drawn from gen for params_b, in their dtypes)."""
    for p, q in zip(params_a, params_b):
        q.grad = torch.randn(q.shape, dtype=q.dtype, generator=gen).to(q.device)
        p.grad = q.grad.clone().to(p.device)


def step_twins(opt_a, params_a, opt_b, params_b, gen=None, steps=1):
    """`steps` steps of two optimizers, each on the same random grads (drawn from gen, in params_b's dtypes)."""
    for _ in range(steps):
        twin_grads(params_a, params_b, gen)
        opt_a.step()
        opt_b.step()


def saved(state_dict):
    """A real checkpoint: state_dict saved with torch.save and loaded (weights_only), sharing no tensor with it."""
    import io
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    return torch.load(io.BytesIO(buf.getvalue()), weights_only=True)


def loaded_twin(opt, params, twin, twin_params):
    """``twin`` (over ``twin_params``) made to continue ``opt``: the params copied, the state loaded from a real
    checkpoint of it."""
    with torch.no_grad():
        for p, q in zip(params, twin_params):
            q.copy_(p)
    twin.load_state_dict(saved(opt.state_dict()))


def fp32_master(opt, p):
    """The fp32 value opt's math updates for param p: its master copy, the bf16 param joined with its remainder
    (param_remainders), or the param itself."""
    from fused_optim.kernels.lean import join_remainder
    st = opt.state[p]
    if "master_param" in st:
        return st["master_param"]
    return join_remainder(p.detach(), st["param_remainder"]) if "param_remainder" in st else p.detach().float()


def launches(*steps):
    """Call each step function; returns the (Triton, C++ engine) launches they made together."""
    from fused_optim.kernels import runtime
    n0, c0 = runtime.launch_count, runtime.engine_launch_count
    for step in steps:
        step()
    return runtime.launch_count - n0, runtime.engine_launch_count - c0


def load_script(*path):
    """A script of the repository (e.g. load_script("bench", "run.py")) imported as a module, without running main."""
    import importlib.util
    import os
    spec = importlib.util.spec_from_file_location(
        os.path.splitext(path[-1])[0], os.path.join(os.path.dirname(__file__), "..", *path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def perturb_fused_adamw(monkeypatch, factor):
    """AdamW.step multiplies the first param by factor after every fused step: a fused path that disagrees."""
    import fused_optim
    step = fused_optim.AdamW.step

    def perturbed(self, *args, **kwargs):
        loss = step(self, *args, **kwargs)
        if self.param_groups[0]["fused"]:
            with torch.no_grad():
                self.param_groups[0]["params"][0].mul_(factor)
        return loss
    monkeypatch.setattr(fused_optim.AdamW, "step", perturbed)


def mse_step(opt, forward, x, y):
    """One training step on the mean squared error of forward(x) against y; returns the loss."""
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(forward(x), y)
    loss.backward()
    opt.step()
    return loss


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


def refuse_persistent_launch(monkeypatch, device):
    """The fused path meets a device that refuses the cooperative (persistent) launch. The interpreter refuses a
    cooperative grid of 2: on the CPU the refusal itself is exercised. A GPU makes 2 programs resident: there the
    step starts from a device that refused (cuda:0, where the tests' params live)."""
    from fused_optim.kernels import runtime
    if device == "cpu":
        monkeypatch.setattr(runtime, "persistent_grid", lambda n_items, device: 2)
        monkeypatch.setattr(runtime, "refused_devices", set())
    else:
        monkeypatch.setattr(runtime, "refused_devices", {"cuda:0"})


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
