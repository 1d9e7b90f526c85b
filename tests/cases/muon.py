"""Muon against torch.optim.Muon: 2-D params only (torch refuses others), wide, tall, square and odd shapes, some
repeated so the fused path batches several matrices per shape."""
import torch

from cases import Case

CASES = [
    Case("Muon", lambda: torch.optim.Muon,
         configs=[{"lr": 0.02},
                  {"lr": 0.02, "nesterov": False, "weight_decay": 0.01, "adjust_lr_fn": "original"},
                  {"lr": 0.02, "momentum": 0.9, "weight_decay": 0.0, "adjust_lr_fn": "match_rms_adamw",
                   "ns_coefficients": (3.0, -3.2, 1.2), "ns_steps": 3, "eps": 1e-4}],
         group2={"lr": 0.01, "weight_decay": 0.05, "adjust_lr_fn": "match_rms_adamw"},
         # (33, 17) spans two programs of the interpreter's small chunks
         shapes=[(5, 3), (3, 5), (33, 17), (5, 3), (1, 7), (8, 8), (3, 5)], shapes2=[(2, 9), (9, 2), (2, 9)],
         complex_ok=False, launches=2,
         # the fused path's batched bf16 matmuls (bmm/baddbmm) round differently from torch's per-matrix ones now
         # and then: one bf16 ulp of an orthogonalized entry (|O| < 1: 2^-8) times the largest adjusted lr here
         # (0.02 * 0.2 * sqrt(33) = 0.023) moves a param by 9e-5 in that step
         kernel_atol=2e-4),
]
