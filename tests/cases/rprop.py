"""Rprop against torch.optim: every option on and off, two groups that differ."""
import torch

from cases import Case

CASES = [
    Case("Rprop", lambda: torch.optim.Rprop,
         configs=[{}, {"lr": 0.05, "etas": (0.3, 1.5), "step_sizes": (1e-3, 0.2)}, {"maximize": True},
                  {"lr": 0.1, "etas": (0.6, 1.1), "step_sizes": (0.02, float("inf")), "maximize": True}],
         group2={"lr": 3e-3, "etas": (0.4, 1.3), "step_sizes": (1e-4, 0.5)}),
]
