"""Lamb against timm.optim. Its max_grad_norm (timm's global clip, default 1.0) clips the default driver's grads
(global norm ~ 45) every step; max_grad_norm=60 clips only some steps, None never. Without adaptation or caution
(the update alone): tests/optimizers/test_lamb_lars.py."""
from anchors import timm_class
from cases import Case

CASES = [
    Case("Lamb", lambda: timm_class("lamb", "Lamb"),
         configs=[{},
                  {"lr": 0.01, "max_grad_norm": 60.0, "bias_correction": False, "grad_averaging": False,
                   "trust_clip": True, "betas": (0.8, 0.99), "eps": 1e-8},
                  {"lr": 0.01, "weight_decay": 0.0, "always_adapt": True, "caution": True},
                  {"lr": 0.01, "weight_decay": 0.1, "decoupled_decay": True, "corrected_weight_decay": True,
                   "trust_clip": True, "caution": True},
                  # last: the bf16 / fp16 check's config. With caution, fp16 states of clipped grads go subnormal
                  # (v ~ 1e-7) and the mask flips where u * g ~ 0: 1.5% from the fp32 run, beyond its 1% bound
                  {"lr": 0.01, "weight_decay": 0.1, "caution": False, "max_grad_norm": None, "trust_clip": True}],
         group2={"lr": 3e-3, "weight_decay": 0.0}, complex_ok=False, launches=2),
]
