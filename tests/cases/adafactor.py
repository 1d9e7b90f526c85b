"""Adafactor against timm.optim."""
from anchors import timm_class
from cases import SHAPES, SHAPES_2, Case


# no empty tensor: timm's RMS of an empty param is 0/0 = NaN, which the comparisons cannot match; factored shapes:
# a conv weight (dims 0, 1; 3 planes), a 3-D param (last two dims, 2 planes), matrices with both dims > 16
ADAFACTOR_SHAPES = [s for s in SHAPES if s != (0,)] + [(20, 18, 3, 1), (2, 17, 19)]

CASES = [
    Case("Adafactor", lambda: timm_class("adafactor", "Adafactor"),
         configs=[{}, {"lr": 0.01}, {"warmup_init": True},
                  {"scale_parameter": False, "decay_rate": -0.5, "clip_threshold": 0.5},
                  {"betas": (0.9, 0.999), "weight_decay": 0.01},
                  {"lr": 0.005, "betas": (0.8, 0.99), "weight_decay": 0.1, "caution": True, "clip_threshold": 2.0},
                  {"min_dim_size_to_factor": 2, "eps": 1e-20}],
         group2={"weight_decay": 0.05, "eps_scale": 1e-2, "clip_threshold": 0.7},
         shapes=ADAFACTOR_SHAPES, shapes2=SHAPES_2 + [(17, 17)], complex_ok=False,
         launches=2),  # reduce (csrc engine or Triton row/col sums), then one persistent launch
]
