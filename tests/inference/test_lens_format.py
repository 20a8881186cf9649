"""The released layout: release roots, transformer/ folders (sharded), single files, and `lensforge export`."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from inference.checkpoint import CheckpointSpec, describe_denoiser, load_denoiser, save_random_checkpoint
from inference.config import ModelConfig, get_preset
from inference.lens_format import (
    INDEX_NAME,
    model_config_from_release,
    release_config,
    transformer_files,
    write_single_file,
)
from pipelines import cli
from tests.inference.tiny_release import LAYERS, TINY_LENS, random_denoiser, save_tiny_release


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return save_tiny_release(tmp_path_factory.mktemp("lens") / "Lens", seed=3)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_a_release_root_loads_from_its_shards_with_its_codec_and_text_encoder(release):
    files = transformer_files(release / "transformer")
    assert len(files) > 1 and (release / "transformer" / INDEX_NAME).is_file()  # sharded, with an index
    source = describe_denoiser(release)
    assert source.kind == "release" and source.spec.model.model_dump(exclude={"name", "base_size"}) == \
        TINY_LENS.model_dump(exclude={"name", "base_size"})
    assert source.spec.codec == f"flux2:{release / 'vae'}" and source.spec.text_encoder == f"gpt-oss:{release}"
    assert source.spec.text_layers == LAYERS
    model = load_denoiser(release)
    assert same_weights(model.state_dict(), random_denoiser(seed=3).state_dict())
    assert describe_denoiser(release / "transformer").kind == "release"  # inside a release root: the release


def test_a_bare_transformer_folder_names_no_codec(release, tmp_path):
    shutil.copytree(release / "transformer", tmp_path / "transformer")
    source = describe_denoiser(tmp_path / "transformer")
    assert source.kind == "transformer" and source.spec.codec is None and source.spec.text_encoder is None
    assert same_weights(load_denoiser(tmp_path / "transformer").state_dict(), random_denoiser(seed=3).state_dict())
    (tmp_path / "transformer" / transformer_files(tmp_path / "transformer")[0].name).unlink()
    with pytest.raises(FileNotFoundError, match="missing shard"):
        load_denoiser(tmp_path / "transformer")


def test_load_keeps_the_files_dtype_or_casts_to_the_one_asked(tmp_path):
    root = save_tiny_release(tmp_path / "bf16", dtype=torch.bfloat16)
    model = load_denoiser(root)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # no fp32 copy
    assert {p.dtype for p in load_denoiser(root, dtype=torch.float32).parameters()} == {torch.float32}
    assert not any(p.is_meta for p in model.parameters())


def test_single_files_bare_or_under_comfyuis_prefix(tmp_path):
    # head width 64: the shapes alone give the whole config (patch 2 and Lens's RoPE split assumed)
    cfg = ModelConfig(name="x", depth=2, hidden=128, heads=2, head_dim=64, in_channels=32, patch=2, text_dim=32,
                      text_layers=2, rope_axes=(8, 28, 28))
    state = random_denoiser(cfg).state_dict()
    save_file(state, str(tmp_path / "bare.safetensors"))
    save_file({f"model.diffusion_model.{k}": v for k, v in state.items()}, str(tmp_path / "comfy.safetensors"))
    for name in "bare", "comfy":
        source = describe_denoiser(tmp_path / f"{name}.safetensors")
        assert source.kind == "single-file" and source.prefix == ("" if name == "bare" else "model.diffusion_model.")
        assert source.spec.model.model_dump(exclude={"name"}) == cfg.model_dump(exclude={"name"})
        assert same_weights(load_denoiser(tmp_path / f"{name}.safetensors").state_dict(), state)
    # other head widths need the config, which a single file may carry in its metadata
    tiny = random_denoiser().state_dict()
    save_file(tiny, str(tmp_path / "noconfig.safetensors"))
    with pytest.raises(ValueError, match="needs its config.json"):
        load_denoiser(tmp_path / "noconfig.safetensors")
    write_single_file(tiny, TINY_LENS, tmp_path / "withconfig.safetensors", LAYERS)
    assert same_weights(load_denoiser(tmp_path / "withconfig.safetensors").state_dict(), tiny)


def test_release_configs_are_checked_field_by_field():
    good = release_config(TINY_LENS, LAYERS)
    for bad, match in ({"inner_dim": 64}, "inner_dim"), ({"gate_mlp": False}, "gate_mlp"), \
            ({"out_channels": 16}, "in_channels"), ({"_class_name": "FluxTransformer2DModel"}, "not a Lens"):
        with pytest.raises(ValueError, match=match):
            model_config_from_release({**good, **bad})


def test_export_round_trip_from_a_release_is_bit_exact(release, tmp_path):
    assert cli.main(["export", str(release), "--out", str(tmp_path / "d")]) == 0
    with pytest.raises(SystemExit):
        cli.main(["export", str(release), "--out", str(tmp_path / "x"), "--format", "onnx"])
    exported = tmp_path / "d" / "transformer"
    assert json.loads((exported / "config.json").read_text()) == {
        **json.loads((release / "transformer" / "config.json").read_text()), "_diffusers_version": json.loads(
            (exported / "config.json").read_text())["_diffusers_version"]}
    def read(files):
        return {k: f.get_tensor(k) for p in files for f in [safe_open(str(p), "pt")] for k in f.keys()}

    assert same_weights(read(transformer_files(exported)), read(transformer_files(release / "transformer")))
    assert cli.main(["export", str(release), "--out", str(tmp_path / "s"), "--format", "single-file",
                     "--prefix", "model.diffusion_model.", "--dtype", "bf16"]) == 0
    single = next((tmp_path / "s").glob("*.safetensors"))
    with safe_open(str(single), "pt") as f:
        assert all(k.startswith("model.diffusion_model.") for k in f.keys())
        assert json.loads(f.metadata()["config"])["selected_layer_index"] == list(LAYERS)
    back = load_denoiser(single)
    assert {p.dtype for p in back.parameters()} == {torch.bfloat16}
    assert same_weights(back.state_dict(), {k: v.bfloat16() for k, v in load_denoiser(release).state_dict().items()})
    source = describe_denoiser(single)  # lensforge's spec travels in the metadata: the codec is still known
    assert source.spec.codec == f"flux2:{release / 'vae'}"


def test_export_of_a_lensforge_run_reads_back_into_lensforge_as_it_was(tmp_path):
    spec = CheckpointSpec(model=get_preset("tiny").model_copy(update={"depth": 2, "prediction": "x"}),
                          codec="pixel", text_encoder="minilm")
    save_random_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000003", spec, seed=5)
    assert cli.main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    config = json.loads((tmp_path / "out" / "transformer" / "config.json").read_text())
    assert config["selected_layer_index"] == [2, 5] and config["in_channels"] == 48 and config["patch_size"] == 1
    source = describe_denoiser(tmp_path / "out" / "transformer")
    assert source.spec == spec  # codec, text encoder and x-prediction survive in the metadata
    x, t, text = torch.randn(1, 48, 8, 8), torch.rand(1), torch.randn(1, 3, 768)
    ours = load_denoiser(tmp_path / "run")
    assert torch.equal(load_denoiser(tmp_path / "out" / "transformer")(x, t, text), ours(x, t, text))
