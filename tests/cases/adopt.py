"""Adopt against timm.optim: clip_exp set and None, L2 and decoupled (corrected) weight decay, caution with each."""
from anchors import timm_class
from cases import Case

CASES = [
    Case("Adopt", lambda: timm_class("adopt", "Adopt"),
         configs=[{}, {"lr": 0.01, "weight_decay": 0.1, "clip_exp": None, "maximize": True, "caution": True},
                  {"lr": 0.01, "weight_decay": 0.1, "decoupled": True, "corrected_weight_decay": True,
                   "caution": True, "betas": (0.3, 0.99), "eps": 1e-4}],
         group2={"lr": 3e-3, "weight_decay": 0.05}),
]
