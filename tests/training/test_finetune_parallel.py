"""Fine-tuning under torchrun with two CPU processes (gloo): FSDP2 builds the model on the meta device and each rank
reads only its rows of the base's files; what it builds is the base exactly (what one process loads), and it trains
as DDP, which loads the whole base in each process, does. The same for LoRA over a sharded frozen base. About 80 s:
four torchrun launches."""

import pytest
import torch
from safetensors.torch import load_file

from inference.checkpoint import load_denoiser
from tests.training.test_parallel import torchrun


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from scenes.shards import cached_scene_shards

    return cached_scene_shards(tmp_path_factory, "two-buckets", {(32, 32): 48, (48, 48): 24},
                               variants=("dense", "short"), shard_size=12)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random tiny model as a released transformer/ folder in several shards (rows cross no file, tensors do
    spread over files)."""
    from inference.config import get_preset
    from inference.lens_format import write_transformer_dir
    from tests.inference.tiny_release import random_denoiser

    folder = tmp_path_factory.mktemp("base") / "transformer"
    model = random_denoiser(get_preset("tiny"), seed=3)
    write_transformer_dir(model.state_dict(), get_preset("tiny"), folder, [2, 5], max_shard_size="2MB")
    assert len(list(folder.glob("*.safetensors"))) > 1
    return folder


@pytest.fixture(scope="module")
def runs(data, base, tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune-dist")
    out = {}
    for strategy in ("ddp", "fsdp"):
        for lora in (False, True):
            name = f"{strategy}{'-lora' if lora else ''}"
            flags = ["--ac", f"--init-from={base}"] + (["--lora"] if lora else [])
            out[name] = torchrun(data, root / name, strategy, 2, *flags)[0]
            out[name + "-start"] = [load_file(str(root / name / f"rank{r}-start.safetensors")) for r in (0, 1)]
    return out


def test_fsdp_builds_the_base_exactly_from_each_ranks_rows(runs, base):
    expected = load_denoiser(base).state_dict()
    for rank_state in runs["fsdp-start"]:
        assert rank_state.keys() == expected.keys()
        assert all(torch.equal(rank_state[k], expected[k]) for k in expected)


@pytest.mark.parametrize("lora", [False, True])
def test_fsdp_and_ddp_fine_tunes_from_a_base_agree(runs, lora):
    ddp, fsdp = (runs[f"{s}{'-lora' if lora else ''}"][0] for s in ("ddp", "fsdp"))
    start = runs[f"fsdp{'-lora' if lora else ''}-start"][0]
    assert any(not torch.equal(fsdp[k], start[k]) for k in fsdp)  # it trained
    for name in ddp:
        torch.testing.assert_close(fsdp[name], ddp[name], rtol=1e-4, atol=1e-5, msg=name)
    if lora:  # the frozen base stayed as built, on every rank
        frozen = [k for k in fsdp if ".lora_" not in k]
        assert frozen and all(torch.equal(fsdp[k], start[k]) for k in frozen)
