"""Adam and AdamW against torch.optim."""
import torch

from cases import Case

CASES = [
    Case("Adam", lambda: torch.optim.Adam,
         configs=[{}, {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}, {"maximize": True, "betas": (0.8, 0.99)},
                  {"weight_decay": 0.1, "decoupled_weight_decay": True}],
         group2={"lr": 3e-3, "eps": 1e-6}),
    Case("AdamW", lambda: torch.optim.AdamW,
         configs=[{}, {"lr": 0.01, "weight_decay": 0.5, "amsgrad": True, "maximize": True}],
         group2={"lr": 3e-3, "weight_decay": 0.0}),
]
