"""Lion against timm.optim (beta1 = 0.3 in the last config takes torch.lerp's large-weight form)."""
from anchors import timm_class
from cases import Case

CASES = [
    Case("Lion", lambda: timm_class("lion", "Lion"),
         configs=[{}, {"lr": 0.01, "weight_decay": 0.1, "betas": (0.8, 0.95), "maximize": True},
                  {"lr": 0.01, "weight_decay": 0.1, "betas": (0.3, 0.99), "caution": True,
                   "corrected_weight_decay": True}],
         group2={"lr": 3e-3, "weight_decay": 0.0}),
]
