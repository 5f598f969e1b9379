"""LOTUS: LOttery Transformers with Ultra Sparsity.

The library behind the `lotus` CLI and the inference service: datasets, the token-gathering
ViT, training, checkpoints (and, in later stages, tickets, pruning masks, export, serving).
"""

from lotus.errors import LotusError

__version__ = "0.1.0"
__all__ = ["LotusError", "__version__"]
