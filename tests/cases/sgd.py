"""SGD against torch.optim."""
import torch

from cases import Case

CASES = [
    Case("SGD", lambda: torch.optim.SGD,
         configs=[{"lr": 0.05}, {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01},
                  {"lr": 0.05, "momentum": 0.9, "nesterov": True, "maximize": True}],
         group2={"lr": 0.02, "weight_decay": 0.1}),
]
