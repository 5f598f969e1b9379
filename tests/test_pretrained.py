"""Starting from a timm weight file (--pretrained-path): timm fits it to the model, LOTUS refuses
what does not fit in one line, the checkpoint records the file, and the recipe holds it."""

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed, resample_patch_embed

from lotus.config import CompressConfig, DataConfig, ModelConfig
from lotus.errors import LotusError
from lotus.settings import check_inputs, check_settings, check_weight_file, from_dict, load_recipe, save_recipe
from lotus.vit import build_model, check_weights_fit, pretrained_source

# The file's model: 32px images in 4px patches (an 8x8 grid), 7 classes, 2 blocks.
SOURCE = dict(img_size=32, patch_size=4, num_classes=7, depth=2)
# The run's: 24px images in 2px patches (a 12x12 grid), 10 classes: every part timm must adapt differs.
RUN = ModelConfig(num_classes=10, img_size=24, patch_size=2, depth=2, drop_path_rate=0.0)


def save_jax_npz(model: torch.nn.Module, path) -> None:
    """`model`'s weights laid out as Google's JAX ViT .npz files are (the layout timm's .npz loader reads)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    dim, heads = model.embed_dim, model.blocks[0].attn.num_heads
    w = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),  # (O, I, H, W) -> (H, W, I, O)
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    for i in range(len(model.blocks)):
        b, jax = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        attn = jax + "MultiHeadDotProductAttention_1/"
        qkv, qkv_bias = np.split(sd[b + "attn.qkv.weight"], 3), np.split(sd[b + "attn.qkv.bias"], 3)
        for name, weight, bias in zip(("query", "key", "value"), qkv, qkv_bias):
            w[attn + f"{name}/kernel"] = weight.T.reshape(dim, heads, -1)  # (D, H, head_dim)
            w[attn + f"{name}/bias"] = bias.reshape(heads, -1)
        w[attn + "out/kernel"] = sd[b + "attn.proj.weight"].reshape(dim, heads, -1).transpose(1, 2, 0)  # (H, head_dim, D)
        w[attn + "out/bias"] = sd[b + "attn.proj.bias"]
        for jax_norm, norm in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            w[jax + f"{jax_norm}/scale"], w[jax + f"{jax_norm}/bias"] = sd[b + f"{norm}.weight"], sd[b + f"{norm}.bias"]
        for dense, fc in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            w[jax + f"MlpBlock_3/{dense}/kernel"] = sd[b + f"mlp.{fc}.weight"].T
            w[jax + f"MlpBlock_3/{dense}/bias"] = sd[b + f"mlp.{fc}.bias"]
    np.savez(path, **w)


@pytest.fixture(scope="module")
def source() -> torch.nn.Module:
    torch.manual_seed(1)
    return timm.create_model("vit_tiny_patch16_224", **SOURCE).eval()


@pytest.fixture(scope="module")
def weight_files(source, tmp_path_factory) -> dict[str, str]:
    """The source model saved as timm's readers take it: safetensors, torch, Google's .npz."""
    root = tmp_path_factory.mktemp("weights")
    files = {suffix: str(root / f"vit_tiny{suffix}") for suffix in (".safetensors", ".pth", ".npz")}
    save_file(source.state_dict(), files[".safetensors"])
    torch.save(source.state_dict(), files[".pth"])
    save_jax_npz(source, files[".npz"])
    return files


# timm's state-dict filter resamples bicubic with antialiasing; its .npz loader bilinear without
RESAMPLING = {".safetensors": ("bicubic", True), ".pth": ("bicubic", True), ".npz": ("bilinear", False)}


@pytest.mark.parametrize("suffix", list(RESAMPLING))
def test_a_weight_file_starts_the_model_fitted_by_timm(source, weight_files, suffix):
    model = build_model(replace(RUN, pretrained=weight_files[suffix]))
    loaded, original = model.state_dict(), source.state_dict()
    for key in [k for k in original if k.startswith(("blocks.", "norm.", "cls_token"))]:
        assert torch.equal(loaded[key], original[key]), key
    assert model.head.weight.shape == (10, 192)  # a new classifier for the data's classes (the file's has 7)
    interpolation, antialias = RESAMPLING[suffix]
    assert model.pos_embed.shape == (1, 1 + 12 * 12, 192)
    assert torch.equal(model.pos_embed[:, :1], source.pos_embed[:, :1])  # the class token's position is kept
    grid = resample_abs_pos_embed(
        source.pos_embed, (12, 12), num_prefix_tokens=1, interpolation=interpolation, antialias=antialias
    )
    torch.testing.assert_close(model.pos_embed, grid)  # the 8x8 grid's positions resampled to 12x12
    patches = resample_patch_embed(source.patch_embed.proj.weight, [2, 2], interpolation=interpolation, antialias=antialias)
    torch.testing.assert_close(model.patch_embed.proj.weight, patches)  # 4px patch filters resampled to 2px


def test_a_deeper_file_gives_its_first_blocks(source, weight_files):
    model = build_model(ModelConfig(num_classes=10, img_size=32, patch_size=4, depth=1, pretrained=weight_files[".safetensors"]))
    assert len(model.blocks) == 1
    assert torch.equal(model.blocks[0].mlp.fc2.weight, source.blocks[0].mlp.fc2.weight)


def test_the_checkpoint_records_the_weights_origin(weight_files):
    cfg = replace(RUN, pretrained=weight_files[".pth"])
    digest = hashlib.sha256(Path(weight_files[".pth"]).read_bytes()).hexdigest()
    assert pretrained_source(cfg, build_model(cfg)) == {"source": "file", "file": weight_files[".pth"], "sha256": digest}
    model = build_model(RUN)
    assert pretrained_source(RUN, model) is None
    hub = {"source": "hub", "weights": "vit_tiny_patch16_224.augreg_in21k_ft_in1k"}  # timm's default tag for the name
    assert pretrained_source(replace(RUN, pretrained=True), model) == hub


@pytest.fixture(scope="module")
def misfits(tmp_path_factory, weight_files) -> dict[str, str]:
    """Weight files vit_tiny_patch16_224 at depth 2 cannot start from."""
    root = tmp_path_factory.mktemp("misfits")
    files = {"small": str(root / "vit_small.safetensors"), "resnet": str(root / "resnet.safetensors")}
    save_file(timm.create_model("vit_small_patch16_224", **SOURCE).state_dict(), files["small"])  # width 384, not 192
    save_file(timm.create_model("resnet18", num_classes=7).state_dict(), files["resnet"])  # no ViT weight at all
    files["one block"] = str(root / "one_block.safetensors")
    save_file(timm.create_model("vit_tiny_patch16_224", **{**SOURCE, "depth": 1}).state_dict(), files["one block"])
    files["one block npz"] = str(root / "one_block.npz")
    save_jax_npz(timm.create_model("vit_tiny_patch16_224", **{**SOURCE, "depth": 1}), files["one block npz"])
    return files


@pytest.mark.parametrize(
    "misfit, problem",
    [
        ("small", "size mismatch for cls_token"),
        ("resnet", "holds no cls_token nor"),
        ("one block", "holds no blocks.1."),
        ("one block npz", "encoderblock_1"),
    ],
)
@pytest.mark.parametrize("load", [build_model, check_weights_fit])
def test_weights_that_do_not_fit_are_refused_in_one_line(misfits, misfit, problem, load):
    with pytest.raises(LotusError, match=f"does not fit vit_tiny_patch16_224: .*{problem}") as error:
        load(replace(RUN, pretrained=misfits[misfit]))
    assert misfits[misfit] in str(error.value) and "\n" not in str(error.value)


def test_weight_files_timm_cannot_read_are_refused_before_torch(tmp_path, weight_files):
    folder = tmp_path / "snapshot"
    folder.mkdir()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(Path(weight_files[".safetensors"]).read_bytes()[:-100])  # a copy cut short
    text = tmp_path / "notes.pth"
    text.write_text("not weights")
    npz = tmp_path / "torch.npz"
    npz.write_bytes(b"\x80\x02 a pickle, not an archive")
    cases = [
        (tmp_path / "missing.safetensors", "not found"),
        (folder, "is a folder: pass the weight file in it"),
        (cut, "is not a whole .safetensors file"),
        (text, "is not a whole .pth file"),
        (npz, "is not a whole .npz file"),
    ]
    for path, message in cases:
        with pytest.raises(LotusError, match=message):
            check_weight_file(path)
    for good in weight_files.values():
        check_weight_file(good)
    with pytest.raises(LotusError, match="is not a timm weight file: pass a .safetensors"):
        ModelConfig(pretrained="weights.ckpt")


def test_settings_refuse_a_weight_file_before_any_work(misfits, weight_files, tmp_path):
    digits = DataConfig("digits", img_size=16)
    check_inputs(digits, model=ModelConfig(depth=2, pretrained=weight_files[".safetensors"]))
    with pytest.raises(LotusError, match="does not fit vit_tiny_patch16_224"):
        check_inputs(digits, model=ModelConfig(depth=2, pretrained=misfits["small"]))
    with pytest.raises(LotusError, match="not found"):
        check_settings(CompressConfig(model=ModelConfig(depth=2, pretrained=str(tmp_path / "gone.safetensors"))))
    with pytest.raises(LotusError, match="does not fit vit_tiny_patch16_224"):
        check_settings(CompressConfig(model=ModelConfig(depth=2, pretrained=misfits["one block"])))
    with pytest.raises(LotusError, match="--checkpoint .* and --pretrained both give the starting weights"):
        check_inputs(digits, tmp_path / "run", model=ModelConfig(pretrained=True))


def test_recipes_take_true_or_a_weight_file(tmp_path, weight_files):
    for value in (True, False, weight_files[".npz"]):
        cfg = from_dict(CompressConfig, {"model": {"pretrained": value}})
        assert cfg.model.pretrained == value
        save_recipe(cfg, tmp_path / "recipe.yaml")
        assert load_recipe(tmp_path / "recipe.yaml") == cfg
    with pytest.raises(LotusError, match="model.pretrained is 1, not true or false or a text"):
        from_dict(CompressConfig, {"model": {"pretrained": 1}})
