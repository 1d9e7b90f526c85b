"""The SGDP / AdamP and Adahessian cases under their former module name, which tests/test_timm_a.py imports (as `ct`):
the same objects as tests/cases/projection.py and tests/cases/adahessian.py (MODES included). Remove this module once
that file imports those two instead."""
from cases.adahessian import CASES as _ADAHESSIAN
from cases.adahessian import hessian_driver  # noqa: F401
from cases.projection import CASES as _PROJECTION
from cases.projection import MODES, projection_driver  # noqa: F401

CASES = _PROJECTION + _ADAHESSIAN
