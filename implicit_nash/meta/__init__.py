"""The gradient-based meta-learning family, plain and as Nash-GBML (one algorithm per file)."""
from .base import META_GRADIENTS, Algorithm
from .cavia import CAVIA
from .fomaml import FOMAML
from .imaml import IMAML
from .maml import MAML
from .metasgd import MetaSGD
from .trmaml import TRMAML

ALGORITHMS = {cls.name: cls for cls in (MAML, FOMAML, MetaSGD, CAVIA, TRMAML, IMAML)}

__all__ = ["Algorithm", "MAML", "FOMAML", "MetaSGD", "CAVIA", "TRMAML", "IMAML", "ALGORITHMS",
           "META_GRADIENTS"]
