"""Lars (LARS / LARC) against timm.optim."""
from anchors import timm_class
from cases import Case

CASES = [
    Case("Lars", lambda: timm_class("lars", "Lars"),
         configs=[{"lr": 0.1},
                  {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01},
                  {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.05, "trust_coeff": 0.01,
                   "eps": 1e-6},
                  {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01, "trust_clip": True},
                  {"lr": 0.5, "momentum": 0.8, "always_adapt": True, "trust_clip": True}],
         group2={"lr": 0.02, "weight_decay": 0.0}, launches=2),
]
