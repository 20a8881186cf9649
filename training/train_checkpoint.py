"""Training checkpoints: `RUN/checkpoints/step_XXXXXXXX/`, written under a temporary name and renamed.

    step_00001000/
        model.safetensors, ema.safetensors, model_config.json   inference/checkpoint.py's layout (`lensforge
                                                                 generate --run RUN` reads it); fp32 weights
        adapter.safetensors, adapter_ema.safetensors             a LoRA run's instead of the two above: the adapters
                                                                 only, with the base's path and fingerprint
                                                                 (inference/lora.py's format)
        optimizer/                                               torch.distributed.checkpoint: one file per rank
                                                                 under FSDP (sharded state), loadable at another
                                                                 world size
        trainer_state.json                                       step, config, per rank: data position and RNG
                                                                 states

A crash at any moment leaves either the previous complete checkpoint or the new one as the latest (only `step_*`
directories count; `.tmp-step_*` ones are incomplete and removed at the next start). Keep-last-K prunes after the
rename.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from common.atomic import sync_dir, sync_tree
from inference.checkpoint import SPEC_FILE, STEP_DIR, CheckpointSpec, save_checkpoint, step_dir_name, step_of
from inference.lora import ADAPTER_FILES, LORA_KEY, LoraInfo, save_adapter
from inference.mmdit import MMDiT
from inference.weights_io import read_header
from training import lora as _lora
from training.ema import EMA, gather_full, plain_name
from training.parallel import Dist, gather_objects

STATE_FILE = "trainer_state.json"
OPTIM_DIR = "optimizer"


def step_dir(run: str | Path, step: int) -> Path:
    return Path(run) / "checkpoints" / step_dir_name(step)


def complete_checkpoints(run: str | Path) -> list[Path]:
    """Step directories with a trainer state, oldest first."""
    ckpts = Path(run) / "checkpoints"
    found = [p for p in ckpts.glob("step_*") if STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=step_of)


def remove_incomplete(run: str | Path) -> None:
    for tmp in (Path(run) / "checkpoints").glob(".tmp-step_*"):
        shutil.rmtree(tmp, ignore_errors=True)


# --- RNG states as JSON ---------------------------------------------------------------------------------------------


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state()
    state = {"torch": _b64(torch.get_rng_state()), "python": [random.getstate()[0], list(random.getstate()[1]),
                                                               random.getstate()[2]],
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    if device.type == "cuda":
        state["cuda"] = _b64(torch.cuda.get_rng_state(device))
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    def tensor(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["torch"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(tensor(state["cuda"]), device)


# --- save and load --------------------------------------------------------------------------------------------------


def save(run: str | Path, step: int, model: nn.Module, optim: torch.optim.Optimizer, ema: EMA,
         spec: CheckpointSpec, rank_state: dict, extra: dict, d: Dist, keep: int,
         lora_info: LoraInfo | None = None, more: Callable[[Path], None] | None = None) -> Path | None:
    """Every rank calls it (collectives under FSDP and for DCP). Returns the directory on rank 0. With
    `lora_info` only the adapters (and their EMA) are written, not the frozen base. `more(tmp)`: every rank writes
    further state into the temporary directory before it is renamed (a distill run's fake score)."""
    final = step_dir(run, step)
    tmp = final.with_name(f".tmp-{final.name}")
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    d.barrier()
    if lora_info is not None:
        weights = gather_full({plain_name(n): p for n, p in model.named_parameters() if p.requires_grad})
    else:
        weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    ema_state = ema.full_state()
    save_optimizer(tmp / OPTIM_DIR, model, optim, d)
    if more is not None:
        more(tmp)
    ranks = gather_objects(rank_state, d)
    if d.main:
        if set(ema_state) != set(weights):
            raise RuntimeError(f"EMA names differ from the model's: {sorted(set(ema_state) ^ set(weights))[:4]}")
        if lora_info is not None:
            save_adapter(tmp / ADAPTER_FILES[1], _lora.adapter_state(weights), lora_info, spec.model_dump_json())
            save_adapter(tmp / ADAPTER_FILES[0], _lora.adapter_state(ema_state), lora_info, spec.model_dump_json())
            (tmp / SPEC_FILE).write_text(spec.model_dump_json(indent=2) + "\n")
        else:
            with torch.device("meta"):
                plain = MMDiT(spec.model)
            plain.load_state_dict(weights, strict=True, assign=True)
            save_checkpoint(tmp, plain, spec, ema=ema_state)
        state = {"step": step, "world_size": d.world, **extra, "ranks": ranks}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
        sync_tree(tmp)  # every rank's files on disk before the step counts as saved (state: fsynced)
        if final.exists():  # the same step saved again (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        sync_dir(final.parent)
        for old in complete_checkpoints(run)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    d.barrier()
    return final if d.main else None


def save_optimizer(where: Path, model: nn.Module, optim: torch.optim.Optimizer, d: Dist) -> None:
    """The optimizer state through DCP (every rank calls it; one file per rank, sharded under FSDP)."""
    with warnings.catch_warnings():  # DCP warns that a single process saves alone: it is meant to
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"optimizer": get_optimizer_state_dict(model, optim)}, checkpoint_id=str(where),
                 no_dist=not d.enabled)


def load_trainer_state(ckpt: Path) -> dict:
    return json.loads((ckpt / STATE_FILE).read_text())


def load_weights(ckpt: Path, model: MMDiT) -> None:
    """model.safetensors into the plain model (before parallelize)."""
    model.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=True)


def load_ema(ckpt: Path, ema: EMA, lora: bool = False) -> None:
    if not lora:
        ema.load_full_state(load_file(str(ckpt / "ema.safetensors")))
        return
    saved = load_file(str(ckpt / ADAPTER_FILES[0]))
    ema.load_full_state({name: saved[_lora.file_key(name)] for name in ema.shadow if _lora.file_key(name) in saved})


def load_adapters(ckpt: Path, info: LoraInfo) -> dict[str, torch.Tensor]:
    """A LoRA run's adapters ({file key: tensor}) from its checkpoint, after checking that they were trained with
    this run's LoRA settings on this base."""
    path = ckpt / ADAPTER_FILES[1]
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt}: no {ADAPTER_FILES[1]}: not a LoRA run's checkpoint (train.lora is set)")
    saved = LoraInfo.model_validate_json(read_header(path)[1][LORA_KEY])
    if saved.base_fingerprint != info.base_fingerprint:
        raise ValueError(f"{ckpt}: the adapters were trained on another base than {info.base} (fingerprint "
                         f"{saved.base_fingerprint[:12]}, now {info.base_fingerprint[:12]})")
    differs = [k for k in ("rank", "alpha", "targets") if getattr(saved, k) != getattr(info, k)]
    if differs:
        raise ValueError(f"{ckpt}: trained with train.lora {', '.join(f'{k}={getattr(saved, k)}' for k in differs)}; "
                         "this config says otherwise")
    return load_file(str(path))


def load_optimizer(ckpt: Path, model: nn.Module, optim: torch.optim.Optimizer, where: str = OPTIM_DIR) -> None:
    """The optimizer state from DCP (`ckpt/where`), resharded to this run's layout (every rank calls it).

    Parameters that never had a gradient (the last block's text stream) have no AdamW state in the file; the
    template drops them too, so they stay stateless exactly as in the run that wrote it."""
    template = get_optimizer_state_dict(model, optim)  # allocates state for every parameter (a zero-lr step)
    saved = dcp.FileSystemReader(str(ckpt / where)).read_metadata().state_dict_metadata
    template["state"] = {name: s for name, s in template["state"].items()
                         if any(k.startswith(f"optimizer.state.{name}.") for k in saved)}
    state = {"optimizer": template}
    dcp.load(state, checkpoint_id=str(ckpt / where), no_dist=not (dist.is_available() and dist.is_initialized()))
    set_optimizer_state_dict(model, optim, state["optimizer"], options=StateDictOptions(strict=False))
