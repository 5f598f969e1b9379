"""LOTUS: LOttery Transformers with Ultra Sparsity.

The library behind the `lotus` CLI and the inference service, one module per pipeline stage:
datasets (`data`), the token-gathering ViT (`vit`) and its token-merging peer (`merge`), data
lottery tickets (`tickets`), pruning masks (`masks`, `prune`, `structured`), training (`train`),
checkpoints (`checkpoint`), the whole pipeline (`pipeline`, `report`), ONNX export (`export`,
`runtime`) and the Triton model repository built on it (`triton`).
"""

from lotus.errors import LotusError

__version__ = "0.1.0"
__all__ = ["LotusError", "__version__"]
