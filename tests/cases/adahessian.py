"""Adahessian against timm.optim. It differentiates the grads: `hessian_driver` runs a real loss with
create_graph=True."""
import torch
import torch.nn.functional as F

from anchors import timm_class
from cases import SHAPES, SHAPES_2, Case

# a second conv weight in each group: the loss's conv2d / matmul terms couple 4-D and 2-D weights
ADAHESSIAN_SHAPES = SHAPES + [(6, 2, 3, 3)]
ADAHESSIAN_SHAPES_2 = SHAPES_2 + [(3, 4, 2, 2)]


def hessian_driver(opts, param_lists, step, gen):
    """loss = sum c p^2 / 2 + sin(a p) b / 4 + tanh of a conv2d / matmul through 4-D / 2-D weights (small inputs),
    same data for all, grads from autograd with create_graph=True. The Hessian diagonal stays within ~[0.6, 2.4]
    (Hutchinson noise from the coupling terms included): near-zero estimates would make 1/|h| amplify rounding
    chaotically and no fp32 comparison would mean anything. timm's z generator is not in the state dict, so every
    optimizer's generator is reseeded alike each step (a loaded checkpoint then draws what the original draws)."""
    data = []
    for p in param_lists[0]:
        a, b = (torch.rand(p.shape, generator=gen, dtype=torch.float64) * 2 - 1 for _ in range(2))
        c = torch.rand(p.shape, generator=gen, dtype=torch.float64) + 1
        x = (torch.randn((2, p.shape[1], 5, 5), generator=gen, dtype=torch.float64) if p.dim() == 4 else
             torch.randn((3, p.shape[1]), generator=gen, dtype=torch.float64) if p.dim() == 2 else None)
        data.append((a, b, c, None if x is None else 0.1 * x))
    seed = int(torch.randint(0, 2 ** 31 - 1, (), generator=gen))
    for opt, params in zip(opts, param_lists):
        loss = 0.0
        for p, (a, b, c, x) in zip(params, data):
            a, b, c = (t.to(p.dtype).to(p.device) for t in (a, b, c))
            loss = loss + (c * p * p / 2 + torch.sin(a * p) * b / 4).sum()
            if x is not None:
                x = x.to(p.dtype).to(p.device)
                loss = loss + torch.tanh(F.conv2d(x, p) if p.dim() == 4 else x @ p.t()).sum()
        for p, g in zip(params, torch.autograd.grad(loss, params, create_graph=True)):
            p.grad = g
        opt.generator.manual_seed(seed)
        opt.step()


CASES = [
    # kernel=False: the generic kernel tests step() on plain grads (no graph) and with AMP arguments, which
    # Adahessian refuses; tests/optimizers/test_projection.py checks its fused path with this driver instead.
    # update_each > 1 is tested there too: p.hess is not in the state dict, so a reloaded run re-estimates early.
    Case("Adahessian", lambda: timm_class("adahessian", "Adahessian"),
         configs=[{}, {"lr": 0.05, "betas": (0.8, 0.99), "weight_decay": 0.01, "hessian_power": 0.5,
                       "n_samples": 2, "avg_conv_kernel": True}],
         group2={"lr": 0.02, "eps": 1e-4}, shapes=ADAHESSIAN_SHAPES, shapes2=ADAHESSIAN_SHAPES_2,
         driver=hessian_driver, kernel=False, complex_ok=False, requires_grad=True),
]
