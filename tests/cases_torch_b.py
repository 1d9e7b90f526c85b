import torch

from cases import Case

CASES = [
    # default t0 = 1e6: mu stays 1 (ax copies the param); small t0: averaging from step t0 + 2 on
    Case("ASGD", lambda: torch.optim.ASGD,
         configs=[{}, {"lr": 0.05, "lambd": 0.01, "alpha": 0.5, "t0": 5, "weight_decay": 0.1},
                  {"t0": 0, "maximize": True, "weight_decay": 0.01}],
         group2={"lr": 0.03, "t0": 3, "lambd": 1e-3},
         ckpt_dtype=torch.float32),  # eta/mu: see Case.ckpt_dtype
    Case("Adamax", lambda: torch.optim.Adamax,
         configs=[{}, {"lr": 0.01, "weight_decay": 0.1, "maximize": True}, {"betas": (0.8, 0.99), "eps": 1e-6}],
         group2={"lr": 5e-3, "weight_decay": 0.05}),
    Case("NAdam", lambda: torch.optim.NAdam,
         configs=[{}, {"weight_decay": 0.1, "momentum_decay": 0.01},
                  {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True},
                  {"betas": (0.8, 0.99)}],
         group2={"lr": 3e-3, "momentum_decay": 2e-3},
         ckpt_dtype=torch.float32),  # mu_product: see Case.ckpt_dtype
    # rho_t > 5 from step 6 on for every beta2 used here except group2's 0.6 (rho_inf = 4: never rectified), so
    # 20 steps cover both branches, and both at once (one group each) from step 6 on
    Case("RAdam", lambda: torch.optim.RAdam,
         configs=[{}, {"lr": 0.01, "betas": (0.9, 0.9), "weight_decay": 0.1},
                  {"weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True}],
         group2={"lr": 3e-3, "betas": (0.8, 0.6)}),
]
