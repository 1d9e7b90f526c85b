"""RAdam against torch.optim."""
import torch

from cases import Case

CASES = [
    # rho_t > 5 from step 6 on for every beta2 used here except group2's 0.6 (rho_inf = 4: never rectified), so
    # 20 steps cover both branches, and both at once (one group each) from step 6 on
    Case("RAdam", lambda: torch.optim.RAdam,
         configs=[{}, {"lr": 0.01, "betas": (0.9, 0.9), "weight_decay": 0.1},
                  {"weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True}],
         group2={"lr": 3e-3, "betas": (0.8, 0.6)}),
]
