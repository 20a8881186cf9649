"""Fine-tuning from a tiny release in the released layout (tests/inference/tiny_release.py, with its own FLUX.2 VAE
and GPT-OSS making the shards): `init_from`, full fine-tunes and their export, LoRA (only adapters train, merged
exports equal the adapter forward), and the refusals that name what differs. About 40 s."""

from __future__ import annotations

import hashlib
import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from inference.checkpoint import describe_denoiser, load_denoiser
from inference.lora import ADAPTER_FILES, DIFFUSERS_FILE, read_adapter
from pipelines import cli
from training.train_config import TrainConfig
from training.trainer import Trainer, train


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    from tests.inference.tiny_release import save_tiny_release

    return save_tiny_release(tmp_path_factory.mktemp("lens") / "Lens")


@pytest.fixture(scope="module")
def data(release, tmp_path_factory):
    """Scenes encoded by the release's own VAE and GPT-OSS (32 × 4 × 4 latents, 4 layers × 32 features)."""
    from scenes.shards import write_scene_shards

    root = tmp_path_factory.mktemp("release-data")
    write_scene_shards(root, {(32, 32): 16}, shard_size=8, codec=f"flux2:{release / 'vae'}",
                       text_encoder=f"gpt-oss:{release}", multiple=16)
    return root


def config(**kw) -> TrainConfig:
    base = dict(max_steps=2, checkpoint_every=2, log_every=1, progress=False, deterministic=True,
                data={"batch_size": 4}, ema={"decay": 0.9})
    return TrainConfig(**{**base, **kw})


def probe(model, seed: int = 0) -> torch.Tensor:
    """The model's output on a fixed input (one 4 × 4 latent, 5 text tokens, t = 0.7)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(2, cfg.in_channels, 4, 4, generator=g)
    text = torch.randn(2, 5, cfg.text_layers * cfg.text_dim, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([0.7, 0.3]), text)


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_init_from_a_release_at_lr_0_reproduces_it_after_a_step(release, data, tmp_path):
    run = tmp_path / "run"
    result = train(config(init_from=str(release), optim={"lr": 0.0}, max_steps=1, checkpoint_every=1), data, run)
    saved = json.loads((run / "config.json").read_text())
    assert saved["init_from"]["kind"] == "release" and saved["train"]["codec"] == f"flux2:{release / 'vae'}"
    imported, tuned = load_denoiser(release), load_denoiser(result["checkpoint"], prefer_ema=False)
    assert torch.equal(probe(imported), probe(tuned))
    assert torch.equal(probe(imported), probe(load_denoiser(result["checkpoint"])))  # the EMA starts at the weights
    record = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][0]
    assert record["kind"] == "init" and record["source"] == "release"


def test_a_full_fine_tune_moves_the_weights_and_its_diffusers_export_loads_back_the_same(release, data, tmp_path):
    run = tmp_path / "run"
    train(config(init_from=str(release), optim={"lr": 1e-3}), data, run)
    tuned = load_denoiser(run)
    assert not torch.equal(probe(tuned), probe(load_denoiser(release)))
    assert cli.main(["export", str(run), "--out", str(tmp_path / "export")]) == 0
    exported = load_denoiser(tmp_path / "export" / "transformer")
    assert torch.equal(probe(tuned), probe(exported))
    # the run's codec and text encoder travel with the export: it generates without naming them
    assert describe_denoiser(tmp_path / "export" / "transformer").spec.codec == f"flux2:{release / 'vae'}"


@pytest.fixture(scope="module")
def lora_run(release, data, tmp_path_factory):
    run = tmp_path_factory.mktemp("lora") / "run"
    files = {p: digest(p) for p in (release / "transformer").glob("*.safetensors")}
    trainer = Trainer(config(init_from=str(release), lora={"rank": 4, "alpha": 8}, optim={"lr": 1e-2}), data, run)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.fit()
    return {"run": run, "trainer": trainer, "before": before, "files": files}


def test_lora_trains_only_the_adapters_and_leaves_the_base_bytes_alone(lora_run, release):
    trainer, before = lora_run["trainer"], lora_run["before"]
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    moved = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= trainable  # the frozen base did not move
    assert {p: digest(p) for p in lora_run["files"]} == lora_run["files"]
    step = lora_run["run"] / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in step.glob("*.safetensors")) == sorted(ADAPTER_FILES)
    adapter = read_adapter(step / "adapter.safetensors")
    assert adapter.info.base == str(release) and adapter.info.base_fingerprint
    full_size = sum(p.stat().st_size for p in (release / "transformer").glob("*.safetensors"))
    assert (step / "adapter.safetensors").stat().st_size < full_size / 3


def test_a_lora_checkpoint_loads_as_its_base_with_the_adapter_merged_equal_to_the_adapter_forward(lora_run):
    trainer = lora_run["trainer"]
    model = trainer.model.eval()
    merged = load_denoiser(lora_run["run"], prefer_ema=False)  # the raw adapters, as the peft model holds them
    torch.testing.assert_close(probe(merged), probe(model), rtol=1e-5, atol=1e-6)
    assert describe_denoiser(lora_run["run"]).kind == "lora"


def test_export_lora_writes_diffusers_keys_with_the_scale_baked_and_merge_lora_equals_the_merged_load(
        lora_run, release, tmp_path, capsys):
    run = lora_run["run"]
    assert cli.main(["export", str(run), "--out", str(tmp_path / "lora"), "--lora"]) == 0
    state = load_file(str(tmp_path / "lora" / DIFFUSERS_FILE))
    assert all(k.startswith("transformer.transformer_blocks.") for k in state)
    ours = read_adapter(run / "checkpoints" / "step_00000002" / "adapter_ema.safetensors")
    name = "transformer_blocks.0.attn.img_qkv"
    a, b, scale = ours.modules[name]
    assert scale == 2.0 and torch.equal(state[f"transformer.{name}.lora_B.weight"], b * 2.0)
    # the exported file applied to the base with `generate --lora` gives the run's merged model
    base = describe_denoiser(release).with_adapters([(tmp_path / "lora" / DIFFUSERS_FILE, 1.0)])
    from inference.checkpoint import load_source

    torch.testing.assert_close(probe(load_source(base)), probe(load_denoiser(run)), rtol=1e-6, atol=1e-6)
    assert cli.main(["export", str(run), "--out", str(tmp_path / "merged"), "--merge-lora"]) == 0
    assert torch.equal(probe(load_denoiser(tmp_path / "merged" / "transformer")), probe(load_denoiser(run)))
    assert cli.main(["export", str(run), "--out", str(tmp_path / "x")]) == 2
    assert "is a LoRA run: --lora writes its adapter, --merge-lora the base" in capsys.readouterr().err


def test_a_changed_base_is_refused_by_its_fingerprint(lora_run, release, tmp_path):
    import shutil

    copy = tmp_path / "Lens"
    shutil.copytree(release, copy)
    run = tmp_path / "run"
    shutil.copytree(lora_run["run"], run)
    adapter = run / "checkpoints" / "step_00000002" / "adapter.safetensors"
    from inference.checkpoint import write_safetensors
    from inference.weights_io import read_header

    meta = read_header(adapter)[1]
    info = json.loads(meta["lensforge.lora"])
    write_safetensors(adapter, load_file(str(adapter)), {**meta, "lensforge.lora": json.dumps({**info,
                                                                                             "base": str(copy)})})
    assert load_denoiser(adapter) is not None  # the same bytes elsewhere: fine
    first = sorted((copy / "transformer").glob("*.safetensors"))[0]
    tensors = load_file(str(first))
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1
    from safetensors.torch import save_file

    save_file(tensors, str(first))
    with pytest.raises(ValueError, match="changed since the adapter was trained"):
        load_denoiser(adapter)


@pytest.fixture(scope="module")
def bare(release, tmp_path_factory):
    """The release's transformer/ folder alone (outside its release root it names no codec or text encoder)."""
    import shutil

    folder = tmp_path_factory.mktemp("bare") / "transformer"
    shutil.copytree(release / "transformer", folder)
    assert describe_denoiser(folder).kind == "transformer" and describe_denoiser(folder).spec.codec is None
    return folder


def test_mismatched_encoders_are_named(release, bare, tmp_path_factory):
    from scenes.shards import cached_scene_shards

    pixel = cached_scene_shards(tmp_path_factory, "one-bucket-32", {(32, 32): 16})
    with pytest.raises(ValueError, match=r"codec\.codec.*flux2:.*pixel|pixel.*flux2"):
        Trainer(config(init_from=str(release)), pixel, tmp_path_factory.mktemp("refused"))
    # a bare transformer names no encoders: the shards' are taken when their shapes fit, else the shapes are named
    with pytest.raises(ValueError, match="latents of 48 channels.*wants 32"):
        Trainer(config(init_from=str(bare)), pixel, tmp_path_factory.mktemp("refused2"))


def test_a_bare_transformer_takes_the_shards_encoders(release, bare, data, tmp_path):
    trainer = Trainer(config(init_from=str(bare), max_steps=1), data, tmp_path / "run")
    assert trainer.init.kind == "transformer"
    assert trainer.spec.codec == f"flux2:{release / 'vae'}" and trainer.spec.text_encoder == f"gpt-oss:{release}"


def test_lora_needs_init_from_and_known_targets(release, data, tmp_path):
    with pytest.raises(ValueError, match="train.lora needs train.init_from"):
        TrainConfig(lora={"rank": 4})
    with pytest.raises(ValueError, match=r"\['attn.to_q'\] match no module"):
        Trainer(config(init_from=str(release), lora={"rank": 4, "targets": ["attn.img_qkv", "attn.to_q"]}),
                data, tmp_path / "run")


def test_a_lora_over_a_bf16_base_keeps_fp32_adapters_and_trains(release, data, tmp_path):
    lora = {"rank": 4, "alpha": 8, "base_dtype": "bfloat16"}
    with pytest.raises(ValueError, match="needs bf16 compute"):
        Trainer(config(init_from=str(release), lora=lora), data, tmp_path / "refused")
    trainer = Trainer(config(init_from=str(release), lora=lora, precision="bf16", optim={"lr": 1e-2}), data,
                      tmp_path / "run")
    dtypes = {p.dtype for n, p in trainer.model.named_parameters() if not p.requires_grad}
    assert dtypes == {torch.bfloat16}
    assert {p.dtype for p in trainer.params} == {torch.float32}
    assert trainer.fit()["step"] == 2


def test_init_from_keeps_the_sources_model_and_refuses_a_lora_on_a_lora(lora_run, release, data, tmp_path):
    with pytest.raises(ValueError, match=r"train.model \{'depth': 2\} differs from init_from's own model"):
        Trainer(config(init_from=str(release), model={"depth": 2}), data, tmp_path / "a")
    same = Trainer(config(init_from=str(release), model={"prediction": "velocity"}, max_steps=1), data, tmp_path / "b")
    assert same.model_cfg.depth == 4
    with pytest.raises(ValueError, match="is a LoRA run: write its merged weights"):
        Trainer(config(init_from=str(lora_run["run"]), lora={"rank": 4}), data, tmp_path / "c")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
