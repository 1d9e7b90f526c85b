"""The test matrix: the Cases of each optimizer family in tests/cases/<family>.py (as in
fused_optim/optimizers/<family>.py; each module defines CASES), gathered here in FAMILIES order.

A Case names our class, its anchor (torch.optim / timm class, or a float64 transcription of the paper), the option
combinations to test and, where plain random dense grads do not fit (sparse, Hessian, closures), a driver.
The generic tests in tests/generic/ (test_anchor.py, test_kernels.py, test_amp.py, ...) run every case.
"""
from __future__ import annotations

import glob
import importlib
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

import fused_optim

# odd sizes, 1-element, 0-d, empty, and a 4-D conv weight; the first group gets these, the second a few more
SHAPES = [(5, 3), (7,), (1,), (), (0,), (4, 3, 3, 3), (67, 33)]
SHAPES_2 = [(11,), (2, 9)]


@dataclass
class Case:
    name: str                                   # our class name in fused_optim
    anchor: Callable | None                     # () -> anchor class (None: the case has its own check)
    configs: list = field(default_factory=lambda: [{}])  # constructor kwargs combinations
    group2: dict = field(default_factory=dict)  # overrides for a second param group
    shapes: list = field(default_factory=lambda: SHAPES)
    shapes2: list = field(default_factory=lambda: SHAPES_2)
    steps: int = 20
    driver: Callable | None = None              # driver(opts, param_lists, step_index, gen): sets grads + steps all
    kernel: bool = True                         # has a fused (Triton) path to test against the reference
    complex_ok: bool = True
    rtol32: float = 1e-6                        # fp32 agreement with the anchor
    atol32: float = 1e-7
    one_group: bool = False                     # takes exactly one param group (LBFGS): both lists go in it
    dense_grads: bool = True                    # False: only the driver's grads fit (sparse): tests that set dense
                                                # grads themselves skip the case
    # param dtype of the checkpoint test. torch's load_state_dict casts every state but `step` to the param dtype,
    # so float32 scalar states (ASGD eta/mu, NAdam mu_product) turn float64 with float64 params and the reloaded run
    # drifts ~1e-8 from the unreloaded one (torch -> torch too); with float32 params the cast changes nothing.
    ckpt_dtype: torch.dtype = torch.float64
    launches: int = 1                           # kernel launches per param group and step (reduction passes count)
    kernel_rtol: float = 1e-5                   # fused vs reference in fp32 (test_kernels.py): float32 rounding, unless
    kernel_atol: float = 1e-6                   # the reference's own math is low precision (Muon's bf16 matmuls)
    requires_grad: bool = False                 # params are leaves that require grad from the start (drivers that
                                                # differentiate the grads w.r.t. them, e.g. Adahessian's Hessian)

    @property
    def cls(self):
        return fused_optim.REGISTRY[self.name.lower()]


# The order of ALL (and so of the parametrized test ids). A family module not listed here is appended in name order.
FAMILIES = ["sgd", "adam", "sparse_adam", "lbfgs", "projection", "adahessian", "adafactor", "novograd", "rprop",
            "adagrad", "rmsprop", "adadelta", "asgd", "adamax", "nadam", "radam", "lion", "adopt", "lars", "lamb"]


def _collect():
    found = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(os.path.dirname(__file__), "*.py")))
    names = FAMILIES + [n for n in found if n not in FAMILIES and n != "__init__"]
    cases = []
    for name in names:
        cases.extend(importlib.import_module(f"cases.{name}").CASES)
    return cases


def make_params(case: Case, dtype=torch.float32, device="cpu", seed=0):
    """Random non-zero params (two groups' worth)."""
    gen = torch.Generator().manual_seed(seed)
    mk = lambda shapes: [(torch.rand(s, generator=gen, dtype=torch.float64) * 2 - 1).add_(0.1).to(dtype).to(device)
                         .requires_grad_(case.requires_grad) for s in shapes]
    return mk(case.shapes), mk(case.shapes2)


def param_groups(case: Case, config: dict, ps1, ps2):
    if case.one_group:
        return [{"params": ps1 + ps2}]
    return [{"params": ps1}, {"params": ps2, **case.group2}]


def step_all(opts, param_lists, grads):
    """Give every optimizer's params the same grads (None: no grad), in each param's dtype and device; step each."""
    for opt, params in zip(opts, param_lists):
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.to(dtype=p.dtype, device=p.device)
        opt.step()


def some_grads(params, step, make):
    """make(i, p) for each param, but now and then None: a param without a grad (its step must not advance)."""
    return [None if (step + i) % 7 == 3 else make(i, p) for i, p in enumerate(params)]


def default_driver(opts, param_lists, step, gen):
    """Same random non-zero grads for every optimizer, then step each."""
    step_all(opts, param_lists, [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in param_lists[0]])


def run(case: Case, opts, param_lists, steps=None, seed=1):
    gen = torch.Generator().manual_seed(seed)
    driver = case.driver or default_driver
    for i in range(case.steps if steps is None else steps):
        driver(opts, param_lists, i, gen)


def clone_params(params):
    return [p.detach().clone().requires_grad_(p.requires_grad) for p in params]


def twins(case: Case, config: dict, make_a, make_b=None, dtype=torch.float64, device="cpu"):
    """Two optimizers on equal copies of the same random params: (a, a's params, b, b's params). make_a / make_b:
    param groups -> optimizer; make_b defaults to the case's anchor with the config."""
    a1, a2 = make_params(case, dtype, device)
    b1, b2 = clone_params(a1), clone_params(a2)
    make_b = make_b or (lambda groups: case.anchor()(groups, **config))
    return make_a(param_groups(case, config, a1, a2)), a1 + a2, make_b(param_groups(case, config, b1, b2)), b1 + b2


def reference(case: Case, config: dict, **kw):
    """param groups -> our optimizer on its reference path with the config (and extra keywords)."""
    return lambda groups: case.cls(groups, fused=False, **config, **kw)


def config_id(config: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in config.items()) or "default"


ALL = _collect()
# (case, config) pairs, flattened for parametrize
MATRIX = [(c, cfg) for c in ALL for cfg in c.configs]
MATRIX_IDS = [f"{c.name}[{config_id(cfg)}]" for c, cfg in MATRIX]
