"""`lotus export triton`: the model repository read with Triton's own configuration schema, checked
against the ONNX files it holds and run in ONNX Runtime; the KServe manifest; refusals."""

import json

import numpy as np
import onnx
import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2  # Triton's ModelConfig schema (the dev extra)
from tritonclient.utils import np_to_triton_dtype

from lotus import LotusError
from lotus.export import keep_idx_path
from lotus.runtime import ort_session, read_metadata
from lotus.triton import INFERENCE_SERVICE, Tensor, TritonConfig, export_triton, inference_service, model_config
from serve.model import ServedModel

DROPS = (0.0, 0.3, 0.5)
CFG = TritonConfig(drops=DROPS, max_batch_size=8, max_queue_delay_us=500, preferred_batch_sizes=(4, 8), instances=2, threads=1)
NAMES = ["lotus_drop0", "lotus_drop0.3", "lotus_drop0.5"]


@pytest.fixture(scope="module")
def repository(tiny_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "models"
    return out, export_triton(tiny_onnx, out, CFG)


def parse_config(folder) -> model_config_pb2.ModelConfig:
    return text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def test_one_model_per_drop_ratio_each_keeping_its_patches(repository):
    out, report = repository
    assert sorted(p.name for p in out.iterdir()) == [INFERENCE_SERVICE, *NAMES]
    assert [(m["name"], m["drop"], m["num_keep"]) for m in report["models"]] == [
        ("lotus_drop0", 0.0, 16),
        ("lotus_drop0.3", 0.3, 11),
        ("lotus_drop0.5", 0.5, 8),
    ]
    assert all(m["max_abs_diff"] <= 1e-5 for m in report["models"])


def test_config_reads_with_tritons_schema_and_matches_the_graph(repository, tiny_onnx):
    out, _ = repository
    served = ServedModel.load(tiny_onnx)  # what `lotus serve` takes and answers
    for name in NAMES:
        config = parse_config(out / name)
        assert config.name == name and config.platform == "onnxruntime_onnx" and config.max_batch_size == 8
        assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
        assert config.dynamic_batching.max_queue_delay_microseconds == 500
        [group] = config.instance_group
        assert group.count == 2 and group.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
        assert config.parameters["intra_op_thread_count"].string_value == "1"
        # The inputs and outputs `lotus serve` names, as the ONNX file holds them.
        assert [i.name for i in config.input] == ["pixel_values"] and [o.name for o in config.output] == ["logits"]
        assert list(config.input[0].dims) == served.input_shape[1:]
        assert list(config.output[0].dims) == [len(served.classes)]
        graph = onnx.load(str(out / name / "1" / "model.onnx")).graph
        for declared, value in [*zip(config.input, graph.input, strict=True), *zip(config.output, graph.output, strict=True)]:
            shape = value.type.tensor_type.shape.dim
            elem = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
            assert declared.name == value.name
            assert model_config_pb2.DataType.Name(declared.data_type) == "TYPE_" + np_to_triton_dtype(elem)
            assert shape[0].dim_param and list(declared.dims) == [d.dim_value for d in shape[1:]]  # batch axis dynamic
        labels = (out / name / config.output[0].label_filename).read_text().splitlines()
        assert labels == served.labels


def test_each_model_runs_as_configured_at_its_drop_ratio(repository, tiny_onnx):
    out, _ = repository
    source = ort_session(tiny_onnx)
    logits = {}
    for name, drop in zip(NAMES, DROPS, strict=True):
        config = parse_config(out / name)
        path = out / name / "1" / "model.onnx"
        session = ort_session(path)
        assert [i.name for i in session.get_inputs()] == ["pixel_values"]  # nothing a batch could mix
        for batch in (1, config.max_batch_size):
            x = np.random.default_rng(batch).standard_normal((batch, *config.input[0].dims), dtype=np.float32)
            got = session.run(None, {"pixel_values": x})[0]
            assert got.shape == (batch, *config.output[0].dims)
            expected = source.run(None, {"pixel_values": x, "drop": np.array(drop, dtype=np.float32)})[0]
            assert np.abs(got - expected).max() <= 1e-5
        logits[drop] = got
        meta = read_metadata(path)
        assert float(meta["drop"]) == drop and json.loads(meta["mean"]) == [0.3] * 3
    assert not np.allclose(logits[0.0], logits[0.5])  # the ratio is in the graph


def test_gpu_instances_and_the_kserve_manifest(repository):
    out, _ = repository
    manifest = yaml.safe_load((out / INFERENCE_SERVICE).read_text())
    assert manifest["apiVersion"] == "serving.kserve.io/v1beta1" and manifest["kind"] == "InferenceService"
    model = manifest["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "triton" and model["protocolVersion"] == "v2"
    assert "YOUR-BUCKET" in model["storageUri"]
    assert "nvidia.com/gpu" not in model["resources"]["limits"]

    gpu = TritonConfig(device="gpu", instances=3)
    tensors = [Tensor("pixel_values", "TYPE_FP32", (3, 16, 16))], [Tensor("logits", "TYPE_FP32", (10,))]
    config = text_format.Parse(model_config("m_drop0", *tensors, gpu, "header"), model_config_pb2.ModelConfig())
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert config.instance_group[0].count == 3 and not config.dynamic_batching.preferred_batch_size
    manifest = yaml.safe_load(inference_service("My_Model", gpu, 10**9))
    assert manifest["metadata"]["name"] == "my-model"  # a Kubernetes name
    assert manifest["spec"]["predictor"]["model"]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_an_existing_entry_is_refused_unless_forced(tiny_onnx, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    out = tmp_path / "models"
    (out / "lotus_drop0").mkdir(parents=True)
    (out / "lotus_drop0" / "notes.txt").write_text("mine")
    (out / "other" / "1").mkdir(parents=True)  # another model of the repository
    args = ["export", "triton", str(tiny_onnx), "--out", str(out), "--drop", "0"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "already exists: pass --force" in refused.stderr
    assert (out / "lotus_drop0" / "notes.txt").read_text() == "mine" and not (out / INFERENCE_SERVICE).exists()

    forced = CliRunner().invoke(app, [*args, "--force"])
    assert forced.exit_code == 0, forced.output
    assert json.loads(forced.stdout)["models"][0]["name"] == "lotus_drop0"
    assert sorted(p.name for p in (out / "lotus_drop0").iterdir()) == ["1", "config.pbtxt", "labels.txt"]
    assert (out / "other" / "1").is_dir() and (out / INFERENCE_SERVICE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]  # no temporary folder left behind


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"drops": (0.0, 0.99)}, "outside"),
        ({"preferred_batch_sizes": (64,)}, "--max-batch-size"),
        ({"name": "a/b"}, "--name"),
    ],
)
def test_bad_settings_are_refused_before_anything_is_written(tiny_onnx, tmp_path, change, message):
    with pytest.raises(LotusError, match=message):
        export_triton(tiny_onnx, tmp_path / "models", TritonConfig(**change))
    assert not (tmp_path / "models").exists()


def test_the_keep_index_graph_is_refused(tiny_onnx, tmp_path):
    with pytest.raises(LotusError, match="not pixel_values and drop"):
        export_triton(keep_idx_path(tiny_onnx), tmp_path / "models", TritonConfig(drops=(0.0,)))


def test_a_token_merging_graph_is_one_model_as_it_is(tiny_onnx, tmp_path):
    """`lotus export onnx --merge R` has no drop ratio to fix: the repository holds it once, named by
    its r, with a config Triton's schema reads and the source graph's logits."""
    from lotus.export import ExportConfig, export_onnx

    merging = tmp_path / "model.tome-r2.onnx"
    export_onnx(tiny_onnx.parent / "run", merging, None, ExportConfig(verify=False, merge=2))
    report = export_triton(merging, tmp_path / "models", CFG)
    assert [(m["name"], m["merge"], m["num_keep"]) for m in report["models"]] == [("lotus_tome-r2", 2, 16)]  # every patch read
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [INFERENCE_SERVICE, "lotus_tome-r2"]
    config = parse_config(tmp_path / "models" / "lotus_tome-r2")
    assert config.name == "lotus_tome-r2" and [i.name for i in config.input] == ["pixel_values"]
    x = np.random.default_rng(0).standard_normal((3, *config.input[0].dims), dtype=np.float32)
    got = ort_session(tmp_path / "models" / "lotus_tome-r2" / "1" / "model.onnx").run(None, {"pixel_values": x})[0]
    np.testing.assert_allclose(got, ort_session(merging).run(None, {"pixel_values": x})[0], atol=1e-6)
    assert "lotus_tome-r2/" in (tmp_path / "models" / INFERENCE_SERVICE).read_text()
