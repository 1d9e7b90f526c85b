"""A fused step never synchronizes with the host: nothing reads a device value back (`.item()`, `.tolist()`,
`.cpu()`, `bool(tensor)`), so steps can be captured in CUDA graphs. On CPU the kernels run under the interpreter
and the readback methods are patched to fail; on CUDA, `torch.cuda.set_sync_debug_mode("error")` checks the same,
and a whole training step is captured in a CUDA graph and replayed against eager execution."""
import pytest
import torch

from cases import ALL, make_params, param_groups
from conftest import DEVICE

# SparseAdam must coalesce its sparse grads (a sync by nature); LBFGS branches on the host by design (its
# docstring counts the syncs); Adahessian's Hutchinson estimate calls autograd.
NO_SYNC = sorted({c.name: c for c in ALL if c.kernel and c.dense_grads}.values(), key=lambda c: c.name)


@pytest.fixture
def no_readback(monkeypatch):
    def forbid(name):
        def fail(*a, **k):
            raise AssertionError(f"host sync: Tensor.{name} called during a fused step")
        return fail

    def patch():
        for name in ("item", "tolist", "cpu", "__bool__", "numpy"):
            monkeypatch.setattr(torch.Tensor, name, forbid(name))

    return patch


@pytest.mark.parametrize("clip", [None, 1.0], ids=["", "max_grad_norm"])
@pytest.mark.parametrize("case", NO_SYNC, ids=lambda c: c.name)
def test_fused_step_reads_nothing_back(case, clip, no_readback):
    if clip and not case.cls.supports_max_grad_norm:
        pytest.skip(f"{case.name} refuses max_grad_norm")
    cfg = case.configs[-1]
    ps1, ps2 = make_params(case, torch.float32, DEVICE)
    opt = case.cls(param_groups(case, cfg, ps1, ps2), fused=True, **{**cfg, "max_grad_norm": clip})
    params = ps1 + ps2
    grads = [torch.randn(p.shape, device=DEVICE) for p in params]
    for _ in range(2):  # warm-up: state creation and table uploads happen here, before capture
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    for p, g in zip(params, grads):
        p.grad = g.clone()
    scale, found_inf = torch.tensor(2.0, device=DEVICE), torch.tensor(0.0, device=DEVICE)
    if DEVICE == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step(grad_scale=scale, found_inf=found_inf)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    else:
        no_readback()
        opt.step(grad_scale=scale, found_inf=found_inf)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD", "NAdam", "RAdam", "NvNovoGrad", "Adafactor"])
def test_cuda_graph_training_step_matches_eager(name):
    import fused_optim

    def setup():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).cuda()
        kw = {"lr": 1e-2} if name != "Adafactor" else {}
        if name == "SGD":
            kw["momentum"] = 0.9
        return model, fused_optim.REGISTRY[name.lower()](model.parameters(), fused=True, capturable=True, **kw) \
            if "capturable" in fused_optim.REGISTRY[name.lower()].__init__.__signature__.parameters else \
            fused_optim.REGISTRY[name.lower()](model.parameters(), fused=True, **kw)

    g = torch.Generator(device="cuda").manual_seed(1)
    xs = [torch.randn(16, 32, device="cuda", generator=g) for _ in range(8)]
    ys = [torch.randn(16, 8, device="cuda", generator=g) for _ in range(8)]

    model, opt = setup()
    for x, y in zip(xs, ys):
        opt.zero_grad(set_to_none=False)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    eager = [p.detach().clone() for p in model.parameters()]

    model, opt = setup()
    sx, sy = xs[0].clone(), ys[0].clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the graph: state, tables and compilation
        for x, y in zip(xs[:3], ys[:3]):
            sx.copy_(x), sy.copy_(y)
            opt.zero_grad(set_to_none=False)
            torch.nn.functional.mse_loss(model(sx), sy).backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.zero_grad(set_to_none=False)
        torch.nn.functional.mse_loss(model(sx), sy).backward()
        opt.step()
    for x, y in zip(xs[3:], ys[3:]):
        sx.copy_(x), sy.copy_(y)
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(model.parameters(), eager):
        torch.testing.assert_close(a.detach(), b, rtol=1e-5, atol=1e-6)
