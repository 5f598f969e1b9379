"""ONNX Runtime sessions and LOTUS model metadata, without torch.

Kept apart from `lotus.export` (which needs torch to build graphs) so that whatever only runs an
exported model (the service, `lotus bench`) stays a small process: importing torch would add
hundreds of megabytes to it.
"""

from __future__ import annotations

from pathlib import Path


def ort_session(
    path: str | Path | bytes, threads: int | None = None, providers: list[str] | None = None, *, spinning: bool = True
):
    """An ONNX Runtime session: CUDA when the installed runtime offers it, else the CPU.

    Args:
        path: the ONNX file, or a serialised model (bytes).
        threads: intra-op threads (None: ONNX Runtime's choice, one per core).
        spinning: let idle intra-op threads spin-wait for the next call. Best for back-to-back
            calls (benchmarks); a server between requests wants it off, or spinning threads burn
            the cores its event loop needs.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    for pool in ("intra_op", "inter_op"):
        options.add_session_config_entry(f"session.{pool}.allow_spinning", "1" if spinning else "0")
    available = ort.get_available_providers()
    providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), options, providers=providers)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata_props of an ONNX file (what `lotus export onnx` records: preprocessing,
    classes, patch grid, sparsity, select block)."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def lotus_metadata(path: str | Path, required: tuple[str, ...]) -> dict[str, str]:
    """The metadata of an exported LOTUS model, or a LotusError saying what is wrong with `path`.

    Args:
        required: the keys the caller needs (e.g. img_size, num_patches, mean, std, classes).
    """
    from lotus.errors import LotusError

    path = Path(path)
    if not path.is_file():
        raise LotusError(f"ONNX model {path} not found: export one with `lotus export onnx`")
    try:
        meta = read_metadata(path)
    except Exception as e:  # protobuf and onnx raise several types for a file that is not a model
        raise LotusError(f"{path} is not an ONNX model ({type(e).__name__}: {e})") from None
    missing = [key for key in required if key not in meta]
    if missing:
        raise LotusError(f"{path} lacks the LOTUS metadata {', '.join(missing)}: export it with `lotus export onnx`")
    return meta


def graph_feed(session, pixel_values, drop: float) -> dict:
    """The inputs of an exported LOTUS graph's `session` for `pixel_values` (numpy, [B, 3, H, W]) at
    `drop`: a drop-by-attention graph takes `drop`, a token-merging one (`--merge`) has no such input."""
    import numpy as np

    feed = {"pixel_values": pixel_values}
    if any(i.name == "drop" for i in session.get_inputs()):
        feed["drop"] = np.array(drop, dtype=np.float32)
    return feed
