"""fused_optim: drop-in fused GPU optimizers for PyTorch (torch.optim and timm.optim signatures).

Every optimizer module under ``fused_optim/optimizers`` registers its classes in the one registry
(``fused_optim.REGISTRY``, name -> class); they are exported here under their anchor's class name.
"""
import importlib
import pkgutil

from ._base import FusedOptimizer
from ._registry import REGISTRY
from . import optimizers as _optimizers
from .factory import create_optimizer, from_config, optimizer_names

for _m in pkgutil.iter_modules(_optimizers.__path__):
    importlib.import_module(f"{__name__}.optimizers.{_m.name}")
globals().update({cls.__name__: cls for cls in REGISTRY.values()})

__all__ = ["FusedOptimizer", "REGISTRY", "create_optimizer", "from_config", "optimizer_names", *sorted(cls.__name__ for cls in REGISTRY.values())]
__version__ = "0.1.0"
