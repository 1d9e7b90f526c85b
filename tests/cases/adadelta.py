"""Adadelta against torch.optim: every option on and off, two groups that differ."""
import torch

from cases import Case

CASES = [
    Case("Adadelta", lambda: torch.optim.Adadelta,
         configs=[{}, {"lr": 0.5, "rho": 0.95, "weight_decay": 0.1}, {"maximize": True, "eps": 1e-4},
                  {"rho": 0.8, "weight_decay": 0.05, "maximize": True}],
         group2={"lr": 0.3, "rho": 0.5, "eps": 1e-5, "weight_decay": 0.01}),
]
