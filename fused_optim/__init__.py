"""fused_optim: drop-in fused GPU optimizers for PyTorch (torch.optim and timm.optim signatures).

Every public optimizer is imported here by name from the module that defines it; each registers itself in the
one registry (``fused_optim.REGISTRY``, lowercase name -> class) that the factory reads.
"""
from ._base import FusedOptimizer
from ._registry import REGISTRY
from .factory import create_optimizer, from_config, optimizer_names
from .optimizers.adadelta import Adadelta
from .optimizers.adafactor import Adafactor
from .optimizers.adagrad import Adagrad
from .optimizers.adahessian import Adahessian
from .optimizers.adam import Adam, AdamW
from .optimizers.adamax import Adamax
from .optimizers.adopt import Adopt
from .optimizers.asgd import ASGD

from .optimizers.lamb import Lamb
from .optimizers.lars import Lars
from .optimizers.lbfgs import LBFGS
from .optimizers.lion import Lion
from .optimizers.muon import Muon
from .optimizers.nadam import NAdam
from .optimizers.novograd import NovoGrad, NvNovoGrad
from .optimizers.projection import SGDP, AdamP
from .optimizers.radam import RAdam
from .optimizers.rmsprop import RMSprop
from .optimizers.rprop import Rprop
from .optimizers.sgd import SGD
from .optimizers.sparse_adam import SparseAdam

__all__ = [
    "FusedOptimizer", "REGISTRY", "create_optimizer", "from_config", "optimizer_names",
    "ASGD", "Adadelta", "Adafactor", "Adagrad", "Adahessian", "Adam", "AdamP", "AdamW", "Adamax", "Adopt", "LBFGS",
    "Lamb", "Lars", "Lion", "Muon", "NAdam", "NovoGrad", "NvNovoGrad", "RAdam", "RMSprop", "Rprop", "SGD", "SGDP",
    "SparseAdam",
]
__version__ = "0.1.0"
