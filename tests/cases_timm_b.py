"""Adafactor, NvNovoGrad (timm anchors) and NovoGrad (anchor: the paper transcription in test_novograd.py)."""
import importlib

from anchors import timm_class
from cases import SHAPES, SHAPES_2, Case


# no empty tensor: timm's RMS of an empty param is 0/0 = NaN, which the comparisons cannot match; factored shapes:
# a conv weight (dims 0, 1; 3 planes), a 3-D param (last two dims, 2 planes), matrices with both dims > 16
ADAFACTOR_SHAPES = [s for s in SHAPES if s != (0,)] + [(20, 18, 3, 1), (2, 17, 19)]


def _paper_novograd():
    return importlib.import_module("test_novograd").PaperNovoGrad


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
    Case("NvNovoGrad", lambda: timm_class("nvnovograd", "NvNovoGrad"),
         configs=[{}, {"lr": 0.01, "weight_decay": 0.1, "grad_averaging": True},
                  {"amsgrad": True, "betas": (0.9, 0.99), "eps": 1e-6},
                  {"lr": 0.01, "weight_decay": 0.1, "decoupled_decay": True},
                  {"lr": 0.01, "weight_decay": 0.1, "decoupled_decay": True, "corrected_weight_decay": True,
                   "amsgrad": True, "grad_averaging": True}],
         group2={"lr": 3e-3, "weight_decay": 0.05}, complex_ok=False, launches=2),
    Case("NovoGrad", _paper_novograd,
         configs=[{}, {"lr": 0.01, "weight_decay": 0.1, "grad_averaging": True},
                  {"amsgrad": True, "betas": (0.9, 0.99), "eps": 1e-6, "weight_decay": 0.01}],
         group2={"lr": 3e-3, "weight_decay": 0.05}, launches=2,
         rtol32=1e-5, atol32=1e-6),  # float32 ops against a float64 transcription
]
