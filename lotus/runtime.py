"""ONNX Runtime sessions and LOTUS model metadata, without torch.

Kept apart from `lotus.export` (which needs torch to build graphs) so that whatever only runs an
exported model (the service, `lotus bench`) stays a small process: importing torch takes a
serving process from about 80 MB to 750 MB.
"""

from __future__ import annotations

from pathlib import Path


def ort_session(path: str | Path, threads: int | None = None, providers: list[str] | None = None, *, spinning: bool = True):
    """An ONNX Runtime session: CUDA when the installed runtime offers it, else the CPU.

    Args:
        threads: intra-op threads (None: ONNX Runtime's choice, one per core).
        spinning: let idle intra-op threads spin-wait for the next call. Best for back-to-back
            calls (benchmarks); a server between requests wants it off, or spinning threads burn
            the cores its event loop needs (measured on 2 cores: 3.4 ms of CPU a call spinning,
            1.1 ms not).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    for pool in ("intra_op", "inter_op"):
        options.add_session_config_entry(f"session.{pool}.allow_spinning", "1" if spinning else "0")
    available = ort.get_available_providers()
    providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return ort.InferenceSession(str(path), options, providers=providers)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata_props of an ONNX file (what `lotus export onnx` records: preprocessing,
    classes, patch grid, sparsity, select block)."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
