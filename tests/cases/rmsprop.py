"""RMSprop against torch.optim: every option on and off, two groups that differ."""
import torch

from cases import Case

CASES = [
    # With momentum, alpha < 0.99: the first steps' g / avg is about 1 / sqrt(1 - alpha) (avg starts at 0), so the
    # buffer sums terms of ~10 at alpha = 0.99, whose last ulp (1e-6) is the kernel test's atol; torch's CPU sqrt is
    # not correctly rounded (1 ulp off in ~20% of elements), which the reference inherits and the kernel cannot.
    # The code path is the same for every alpha. alpha = 0.3 (centered) takes lerp's weight >= 0.5 branch.
    Case("RMSprop", lambda: torch.optim.RMSprop,
         configs=[{}, {"centered": True}, {"momentum": 0.9, "alpha": 0.9, "weight_decay": 0.1},
                  {"centered": True, "momentum": 0.9, "alpha": 0.9, "weight_decay": 0.01, "maximize": True},
                  {"centered": True, "alpha": 0.3, "eps": 1e-4, "maximize": True}, {"weight_decay": 0.1}],
         group2={"lr": 3e-3, "alpha": 0.8, "eps": 1e-6, "weight_decay": 0.02}),
]
