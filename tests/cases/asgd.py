"""ASGD against torch.optim."""
import torch

from cases import Case

CASES = [
    # default t0 = 1e6: mu stays 1 (ax copies the param); small t0: averaging from step t0 + 2 on
    Case("ASGD", lambda: torch.optim.ASGD,
         configs=[{}, {"lr": 0.05, "lambd": 0.01, "alpha": 0.5, "t0": 5, "weight_decay": 0.1},
                  {"t0": 0, "maximize": True, "weight_decay": 0.01}],
         group2={"lr": 0.03, "t0": 3, "lambd": 1e-3},
         ckpt_dtype=torch.float32),  # eta/mu: see Case.ckpt_dtype
]
