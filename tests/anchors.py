"""The anchors live in the package (fused_optim/anchors.py); the test modules import them from here."""
from fused_optim.anchors import timm_class, timm_module  # noqa: F401
