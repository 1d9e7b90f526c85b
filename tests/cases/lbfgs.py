"""LBFGS against torch.optim: closure-driven, one param group."""
import torch

from cases import Case


def rosenbrock(x):
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def lbfgs_driver(opts, param_lists, step, gen):
    """One step() of each optimizer on a chained Rosenbrock over all params plus a per-step random linear term
    (a changing mini-batch), with the grads from autograd; every optimizer must call its closure equally often."""
    n = sum(p.numel() * (2 if p.is_complex() else 1) for p in param_lists[0])
    shift = 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
    calls = []
    for opt, params in zip(opts, param_lists):
        count = [0]

        def closure(params=params, count=count):
            count[0] += 1
            leaves = [p.detach().requires_grad_() for p in params]
            x = torch.cat([torch.view_as_real(v).reshape(-1) if v.is_complex() else v.reshape(-1) for v in leaves])
            loss = rosenbrock(x) + (shift.to(x.dtype) * x).sum()
            for p, g in zip(params, torch.autograd.grad(loss, leaves)):
                p.grad = g
            return loss.detach()

        opt.step(closure)
        calls.append(count[0])
    assert len(set(calls)) == 1, f"closure calls differ: {calls}"


CASES = [
    Case("LBFGS", lambda: torch.optim.LBFGS,
         configs=[{}, {"line_search_fn": "strong_wolfe"},
                  {"lr": 0.5, "history_size": 3, "max_iter": 6},
                  {"line_search_fn": "strong_wolfe", "history_size": 4, "max_iter": 8, "max_eval": 9}],
         driver=lbfgs_driver, kernel=False, one_group=True, steps=10),
]
