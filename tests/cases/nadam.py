"""NAdam against torch.optim."""
import torch

from cases import Case

CASES = [
    Case("NAdam", lambda: torch.optim.NAdam,
         configs=[{}, {"weight_decay": 0.1, "momentum_decay": 0.01},
                  {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True},
                  {"betas": (0.8, 0.99)}],
         group2={"lr": 3e-3, "momentum_decay": 2e-3},
         ckpt_dtype=torch.float32),  # mu_product: see Case.ckpt_dtype
]
