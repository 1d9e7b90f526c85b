"""Adamax against torch.optim."""
import torch

from cases import Case

CASES = [
    Case("Adamax", lambda: torch.optim.Adamax,
         configs=[{}, {"lr": 0.01, "weight_decay": 0.1, "maximize": True}, {"betas": (0.8, 0.99), "eps": 1e-6}],
         group2={"lr": 5e-3, "weight_decay": 0.05}),
]
