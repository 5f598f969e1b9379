"""A Triton Inference Server model repository from an exported LOTUS model, and a KServe manifest.

`model.onnx` applies one drop ratio to a whole call: its `drop` input is a scalar, because every
image of a batch must keep the same number of patches K for the tensors to stay rectangular.
Triton's dynamic batcher concatenates requests along the batch axis and cannot be told to merge
only requests that agree on another input, so a `drop` input would let it run one request at
another's ratio. Instead the repository holds one model per drop ratio, `NAME_dropR`, with R
fixed in the graph as a constant: each model takes `pixel_values` alone, as `lotus serve` does,
its batches hold only its own requests, and a client picks the ratio by picking the model.
The cost is one copy of the weights per ratio, on disk and in memory.

    DIR/NAME_drop0.3/config.pbtxt      platform onnxruntime_onnx, dynamic batching, instances
    DIR/NAME_drop0.3/labels.txt        one label per logit (Triton's classification extension)
    DIR/NAME_drop0.3/1/model.onnx      model.onnx with drop = 0.3 fixed
    DIR/inferenceservice.yaml          KServe InferenceService serving DIR with Triton (v2 protocol)

A token-merging graph (`lotus export onnx --merge R`) has no drop ratio to choose: it becomes
one model, `NAME_tome-rR`, as it is.

Nothing under DIR is replaced unless `force`: entries are built in a temporary folder beside
DIR, each graph checked against the source graph at its ratio, and moved into place at the end.
Other models in DIR are left alone.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import lotus
from lotus.drop import MAX_DROP, num_keep
from lotus.errors import LotusError
from lotus.runtime import graph_feed, lotus_metadata, ort_session

DROP_INPUT = "drop"
INFERENCE_SERVICE = "inferenceservice.yaml"
LABELS = "labels.txt"
STORAGE_URI = "s3://YOUR-BUCKET/PATH/TO/REPOSITORY"  # placeholder the user replaces
TRITON_TYPES = {  # ONNX TensorProto element type -> Triton data type
    1: "TYPE_FP32",
    2: "TYPE_UINT8",
    3: "TYPE_INT8",
    6: "TYPE_INT32",
    7: "TYPE_INT64",
    9: "TYPE_BOOL",
    10: "TYPE_FP16",
    11: "TYPE_FP64",
    16: "TYPE_BF16",
}


@dataclass(frozen=True)
class TritonConfig:
    name: str = "lotus"  # model name prefix: the repository holds NAME_dropR for each drop ratio R
    drops: tuple[float, ...] = (0.0, 0.1, 0.3, 0.5)  # drop ratios served, one model each (those the export verifies)
    max_batch_size: int = 32  # most images in one model call, as `lotus serve --max-batch`
    max_queue_delay_us: int = 2000  # longest a request waits for others to join its batch, in microseconds
    preferred_batch_sizes: tuple[int, ...] = ()  # batch sizes the batcher aims for; () = as large as it can
    device: str = "cpu"  # where each instance runs: 'cpu' (KIND_CPU) or 'gpu' (KIND_GPU, every visible GPU)
    instances: int = 1  # model instances per device, each running one batch at a time
    threads: int | None = None  # ONNX Runtime intra-op threads per instance; None = its own choice (all cores)
    force: bool = False  # replace existing repository entries of the same names


@dataclass(frozen=True)
class Tensor:
    """An input or output as Triton's model configuration declares it."""

    name: str
    data_type: str  # Triton's, e.g. TYPE_FP32
    dims: tuple[int, ...]  # without the batch axis; -1 where the graph's axis is not fixed


def model_name(name: str, drop: float, merge: int = 0) -> str:
    """The repository entry of one drop ratio: 'lotus', 0.3 -> 'lotus_drop0.3'; of a merging graph
    (`merge` > 0, no drop ratio): 'lotus', r 8 -> 'lotus_tome-r8'."""
    return f"{name}_tome-r{merge}" if merge else f"{name}_drop{drop:g}"


def fix_drop_(model, drop: float) -> None:
    """Make `drop` a constant of the graph (an ONNX ModelProto, changed in place): the input goes,
    an initializer of the same name takes its place, so every node reads `drop` unchanged."""
    from onnx import numpy_helper

    value = numpy_helper.from_array(np.array(drop, dtype=np.float32), DROP_INPUT)
    for init in model.graph.initializer:
        if init.name == DROP_INPUT:
            init.CopyFrom(value)
            return
    inputs = [i for i in model.graph.input if i.name != DROP_INPUT]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    model.graph.initializer.append(value)


def batched_tensors(values) -> list[Tensor]:
    """The graph's inputs or outputs (ONNX ValueInfoProtos) as Triton declares them: the first
    axis is the batch, which must be dynamic for Triton to batch requests."""
    tensors = []
    for value in values:
        shape = value.type.tensor_type.shape.dim
        elem_type = value.type.tensor_type.elem_type
        if not shape or shape[0].HasField("dim_value"):
            raise LotusError(f"{value.name} has no dynamic batch axis: export the model again with `lotus export onnx`")
        if elem_type not in TRITON_TYPES:
            raise LotusError(f"{value.name} has ONNX element type {elem_type}, which Triton's configuration cannot declare")
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in shape[1:])
        tensors.append(Tensor(value.name, TRITON_TYPES[elem_type], dims))
    return tensors


def model_config(name: str, inputs: list[Tensor], outputs: list[Tensor], cfg: TritonConfig, header: str) -> str:
    """config.pbtxt in protobuf text format (Triton's ModelConfig), `header` as its first comments."""

    def tensors(key: str, items: list[Tensor], extra: str = "") -> list[str]:
        lines = [f"{key} ["]
        for i, t in enumerate(items):
            dims = ", ".join(map(str, t.dims))
            lines += ["  {", f'    name: "{t.name}"', f"    data_type: {t.data_type}", f"    dims: [ {dims} ]"]
            lines += [extra] if extra else []
            lines.append("  }," if i < len(items) - 1 else "  }")
        return [*lines, "]"]

    batching = ["dynamic_batching {"]
    if cfg.preferred_batch_sizes:
        batching.append(f"  preferred_batch_size: [ {', '.join(map(str, cfg.preferred_batch_sizes))} ]")
    batching += [f"  max_queue_delay_microseconds: {cfg.max_queue_delay_us}", "}"]
    lines = [
        *(f"# {line}" for line in header.splitlines()),
        f'name: "{name}"',
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {cfg.max_batch_size}",
        *tensors("input", inputs),
        *tensors("output", outputs, f'    label_filename: "{LABELS}"'),
        *batching,
        "instance_group [",
        "  {",
        f"    count: {cfg.instances}",
        f"    kind: KIND_{cfg.device.upper()}",
        "  }",
        "]",
    ]
    if cfg.threads:
        lines.append(f'parameters {{ key: "intra_op_thread_count" value: {{ string_value: "{cfg.threads}" }} }}')
    return "\n".join(lines) + "\n"


def inference_service(name: str, cfg: TritonConfig, weight_bytes: int, first: str | None = None) -> str:
    """A KServe InferenceService (YAML) whose Triton predictor serves the repository from object
    storage over the v2 protocol. Its memory is about twice the weights of every loaded model
    instance, plus 1 GiB for Triton itself. `first`: a model of the repository, named in a comment
    (default: the lowest drop ratio's)."""
    service = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63] or "lotus"  # a DNS-1123 label
    memory_gib = math.ceil((2 * weight_bytes * cfg.instances) / 2**30 + 1)
    gpu = ['          nvidia.com/gpu: "1"'] if cfg.device == "gpu" else []
    return "\n".join(
        [
            f"# Written by `lotus export triton` (LOTUS {lotus.__version__}): KServe runs Triton on the model repository",
            "# this file lies in. Copy the folder to object storage and set storageUri to it.",
            "apiVersion: serving.kserve.io/v1beta1",
            "kind: InferenceService",
            "metadata:",
            f"  name: {service}",
            "spec:",
            "  predictor:",
            "    model:",
            "      modelFormat:",
            "        name: triton",
            "      protocolVersion: v2",
            f"      storageUri: {STORAGE_URI}  # the folder holding {first or model_name(name, min(cfg.drops))}/ and the other models",
            "      resources:",
            "        requests:",
            f'          cpu: "{(cfg.threads or 1) * cfg.instances}"',
            f"          memory: {memory_gib}Gi",
            "        limits:",
            f"          memory: {memory_gib}Gi",
            *gpu,
            "",
        ]
    )


def check_config(cfg: TritonConfig) -> None:
    """A one-line LotusError for any setting Triton would refuse, before anything is read or written."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", cfg.name):
        raise LotusError(f"--name {cfg.name!r} must be letters, digits, '_', '.' or '-' (it names folders and URLs)")
    if not cfg.drops:
        raise LotusError("--drop names no drop ratio: give at least one, e.g. 0,0.3")
    for drop in cfg.drops:
        if not 0 <= drop <= MAX_DROP:
            raise LotusError(f"--drop {drop:g} is outside [0, {MAX_DROP}]")
    if cfg.max_batch_size < 1:
        raise LotusError(f"--max-batch-size {cfg.max_batch_size} must be at least 1")
    if cfg.max_queue_delay_us < 0:
        raise LotusError(f"--max-queue-delay-us {cfg.max_queue_delay_us} must not be negative")
    for size in cfg.preferred_batch_sizes:
        if not 1 <= size <= cfg.max_batch_size:
            raise LotusError(f"--preferred-batch-sizes {size} is outside 1..{cfg.max_batch_size} (--max-batch-size)")
    if cfg.device not in ("cpu", "gpu"):
        raise LotusError(f"--device {cfg.device!r} is not supported: use cpu or gpu")
    if cfg.instances < 1 or (cfg.threads is not None and cfg.threads < 1):
        raise LotusError("--instances and --threads must be at least 1")


def check_free(out: Path, entries: list[str], force: bool) -> None:
    """Refuse to overwrite what is already in the repository unless `force`: a user's models and
    files stay theirs. An empty folder counts as free."""
    if out.exists() and not out.is_dir():
        raise LotusError(f"--out {out} is a file: give the model repository folder")
    for entry in entries:
        path = out / entry
        taken = path.is_file() or (path.is_dir() and any(path.iterdir()))
        if taken and not force:
            raise LotusError(
                f"{path} already exists: pass --force to replace it (other models in {out} stay), or choose another --out or --name"
            )


def export_triton(
    source: str | Path, out: str | Path, cfg: TritonConfig = TritonConfig(), *, log: Callable[[str], None] = lambda line: None
) -> dict[str, Any]:
    """Write a Triton model repository under `out` (one model per drop ratio) and a KServe
    InferenceService for it, from `source`, a drop-by-attention graph of `lotus export onnx`.

    Returns a report: the models written (name, drop ratio, patches kept, max |logit difference|
    from the source graph at that ratio) and the paths. A token-merging graph gives one model
    (`cfg.drops` do not apply).
    """
    import onnx

    check_config(cfg)
    source, out = Path(source), Path(out)
    meta = lotus_metadata(source, ("num_patches", "classes"))
    merge = int(meta.get("merge_per_block", 0))
    drops = [0.0] if merge else sorted({float(drop) for drop in cfg.drops})
    names = [model_name(cfg.name, drop, merge) for drop in drops]
    check_free(out, [*names, INFERENCE_SERVICE], cfg.force)
    graph = onnx.load(str(source))
    if [i.name for i in graph.graph.input] != (["pixel_values"] if merge else ["pixel_values", DROP_INPUT]):
        raise LotusError(
            f"{source} takes inputs {[i.name for i in graph.graph.input]}, not pixel_values and drop: "
            "export the drop-by-attention graph (model.onnx) or a token-merging one with `lotus export onnx`"
        )
    out.mkdir(parents=True, exist_ok=True)
    num_patches = int(meta["num_patches"])
    labels = json.loads(meta.get("labels") or meta["classes"])  # exports before labels were recorded: the classes
    models = []
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        for name, drop in zip(names, drops):
            if merge:
                log(f"writing {name}: {merge} tokens merged per block, as the graph is")
            else:
                log(f"writing {name}: drop {drop:g}, {num_keep(num_patches, drop)} of {num_patches} patches kept")
                fix_drop_(graph, drop)
            models.append(_write_model(graph, Path(tmp) / name, name, drop, num_patches, labels, cfg, source, merge))
        weight_bytes = sum(m["bytes"] for m in models)
        (Path(tmp) / INFERENCE_SERVICE).write_text(inference_service(cfg.name, cfg, weight_bytes, names[0]))
        _check_against_source(source, Path(tmp), models)
        for entry in [*names, INFERENCE_SERVICE]:
            _move_into_place(Path(tmp) / entry, out / entry, Path(tmp))
    return {
        "source": str(source),
        "repository": str(out),
        "models": [{**m, "path": str(out / m["name"])} for m in models],
        "inference_service": str(out / INFERENCE_SERVICE),
    }


def _write_model(
    graph,
    folder: Path,
    name: str,
    drop: float,
    num_patches: int,
    labels: list[str],
    cfg: TritonConfig,
    source: Path,
    merge: int = 0,
) -> dict[str, Any]:
    """One repository entry: config.pbtxt, labels.txt and 1/model.onnx (`graph`, its drop fixed;
    a merging graph as it is)."""
    import onnx

    keep = num_keep(num_patches, drop)
    props = {p.key: p.value for p in graph.metadata_props}
    setting = f"{merge} tokens merged per block" if merge else f"drop fixed at {drop:g}"
    props.update(
        drop=str(drop),
        num_keep=str(keep),
        inputs=f"pixel_values float32 [B,3,H,W] normalised (x/255 - mean) / std; {setting} in the graph",
    )
    del graph.metadata_props[:]
    for key, value in props.items():
        graph.metadata_props.add(key=key, value=value)
    (folder / "1").mkdir(parents=True)
    onnx.save(graph, str(folder / "1" / "model.onnx"))
    kept = (
        f"every patch read, {merge} tokens merged after each block"
        if merge
        else f"{keep} of {num_patches} patches kept per image"
    )
    header = (
        f"Written by `lotus export triton` (LOTUS {lotus.__version__}) from {source.name}: {setting}\n"
        f"in the graph, {kept}. Preprocessing: the graph's metadata_props."
    )
    inputs, outputs = batched_tensors(graph.graph.input), batched_tensors(graph.graph.output)
    (folder / "config.pbtxt").write_text(model_config(name, inputs, outputs, cfg, header))
    (folder / LABELS).write_text("".join(" ".join(label.split()) + "\n" for label in labels))
    return {"name": name, "drop": drop, "merge": merge, "num_keep": keep, "bytes": (folder / "1" / "model.onnx").stat().st_size}


def _check_against_source(source: Path, folder: Path, models: list[dict[str, Any]], batch: int = 2) -> None:
    """Each written graph must give the source graph's logits at its drop ratio (ONNX Runtime, random
    images); the max |difference| goes into its report entry."""
    session = ort_session(source)
    shape = [batch, *session.get_inputs()[0].shape[1:]]
    pixel_values = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    for model in models:
        expected = session.run(None, graph_feed(session, pixel_values, model["drop"]))[0]
        got = ort_session(folder / model["name"] / "1" / "model.onnx").run(None, {"pixel_values": pixel_values})[0]
        model["max_abs_diff"] = float(np.abs(got - expected).max())
        if model["max_abs_diff"] > 1e-4:
            raise LotusError(
                f"{model['name']} differs from {source.name} at drop {model['drop']:g} by {model['max_abs_diff']:.2e}: "
                "the repository was not written"
            )


def _move_into_place(new: Path, dest: Path, trash: Path) -> None:
    """Put `new` at `dest`; an existing `dest` (allowed by check_free) is moved into `trash` first."""
    if dest.is_file() or (dest.is_dir() and any(dest.iterdir())):
        os.replace(dest, trash / f"replaced-{dest.name}")
    os.replace(new, dest)
