"""How many patches a drop ratio keeps: one definition for tickets, training, export and serving.

Without torch, so the service can import it (see `lotus.runtime`).
"""

from __future__ import annotations

import numpy as np

from lotus.errors import LotusError

MAX_DROP = 0.95  # highest drop ratio the exported graph is served at (at least one patch must stay)


def num_keep(num_patches: int, drop):
    """Patches kept per image at `drop`: N - round(drop * N), at least one.

    Computed in float32 with round half to even, as the exported ONNX graph computes it, so
    tickets, training, export and the service agree on K at every ratio.

    Args:
        num_patches: N, the image's patch count.
        drop: a float, or a 0-d torch tensor inside a traced graph (returns an int64 tensor).
    """
    if hasattr(drop, "float"):  # a torch tensor: stay in the graph
        return (num_patches - (drop.float() * num_patches).round()).long().clamp(1, num_patches)
    dropped = round(float(np.float32(drop) * np.float32(num_patches)))
    return min(max(num_patches - dropped, 1), num_patches)


def select_block_of(depth: int, select_block: int | None = None) -> int:
    """The block whose class-token attention picks the kept patches, in the exported graph and in
    drop-aware training: `select_block`, or by default depth // 6 (block 2 of 12)."""
    block = select_block if select_block is not None else depth // 6
    if not 0 <= block < depth:
        raise LotusError(f"--select-block {block} is outside 0..{depth - 1}")
    return block
