"""The trainer: shards → a Lens MMDiT trained with rectified flow, checkpointed so that a killed run resumes exactly.

    lensforge train --data data --out runs/demo --preset tiny --max-steps 2000
    torchrun --nproc-per-node 8 -m pipelines.cli train --data data --out runs/lens --preset lens-3.8b \\
        --set train.parallel.strategy=fsdp --set train.parallel.activation_checkpointing=true

    lensforge train --data data --out runs/ft --init-from /models/Lens --config configs/lens-lora.yaml   # fine-tune

One step on every rank: the loader's batch for (seed, rank, step) (its own bucket and batch size), flow matching
loss from `inference.flow` (logit-normal t with Lens's resolution shift, velocity target), backward, global grad
norm clip, AdamW, EMA. `train.init_from` starts from existing weights (their architecture, codec and text encoder,
checked against the shards); `train.lora` trains peft adapters only (training/lora.py) and checkpoints hold only
them; training/model_init.py builds the model either way, sharded from the files under FSDP. A non-finite loss
or gradient on any rank skips the step on all of them; `max_bad_steps` in a row stop training, leaving the last
checkpoint as it was.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

from common.atomic import write_json
from inference.checkpoint import CheckpointSpec, DenoiserSource, describe_denoiser, source_fingerprint
from inference.flow import RectifiedFlow
from inference.lora import LoraInfo
from training import lora
from training import train_checkpoint as ckpt
from training.ema import EMA, gather_full, plain_name
from training.loader import Loader, holdout_batches, inline, open_shard_set, prefetch, seed_of
from training.metrics import MetricsLog, SampleGrid, memory_gb, train_flops, validation_loss
from training.model_init import build_model
from training.parallel import Dist, all_reduce, autocast, init_distributed
from training.train_config import OptimConfig, TrainConfig


class TrainingStopped(RuntimeError):
    """Training cannot go on (repeated non-finite losses); the message says why and what is intact."""


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over `warmup_steps`, then constant (Lens: constant 2e-4). `step` counts from 1."""
    warmup = cfg.optim.warmup_steps
    return cfg.optim.lr * min(1.0, step / warmup) if warmup else cfg.optim.lr


def build_optimizer(model: torch.nn.Module, optim: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms, biases or embeddings' biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, fused=device.type == "cuda")


def grad_norm_and_clip(params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """The global gradient norm (DTensor shards reduced over ranks), clipping to `max_norm` when given."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return norm


def set_determinism(cfg: TrainConfig, device: torch.device) -> None:
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True


class Trainer:
    def __init__(self, cfg: TrainConfig, data: str | Path, out: str | Path, resume: bool = False,
                 d: Dist | None = None):
        self.cfg, self.run = cfg, Path(out)
        self.d = d or init_distributed(cfg.device)
        # Every rank makes the run directory: a rank may write there (its FSDP shards, a judge journal) before the
        # main rank has written config.json, and on nodes without a shared disk each needs its own.
        self.run.mkdir(parents=True, exist_ok=True)
        device = self.device = self.d.device
        set_determinism(cfg, device)
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
        self.init = describe_denoiser(cfg.init_from) if cfg.init_from else None
        self.model_cfg = self.init.spec.model if self.init else cfg.model_config_resolved()
        if self.init and cfg.model:  # the architecture (and prediction) are the weights'; an equal override is fine
            differs = {k: v for k, v in cfg.model.items() if getattr(self.model_cfg, k, None) != v}
            if differs:
                raise ValueError(f"train.model {differs} differs from init_from's own model "
                                 f"({ {k: getattr(self.model_cfg, k, None) for k in differs} }): a fine-tune keeps "
                                 "the architecture and prediction of the weights it starts from")
        self.cfg = cfg = encoders_from_init(cfg, self.init, self.d.main)
        self.cfg = cfg = self.open_data(data, cfg)  # sets data_id and text_date
        self.spec = CheckpointSpec(model=self.model_cfg, codec=cfg.codec, text_encoder=cfg.text_encoder,
                                   text_layers=self.init.spec.text_layers if self.init else None,
                                   text_date=self.text_date)
        self.lora_info = None
        if cfg.lora is not None and lora.base_dtype(cfg.lora, device) != torch.float32 and not self.bf16:
            raise ValueError(f"train.lora.base_dtype {cfg.lora.base_dtype} on {device} needs bf16 compute: set "
                             "train.precision: bf16, or base_dtype: float32")
        if cfg.lora is not None and self.init.adapters:
            raise ValueError(f"train.init_from {cfg.init_from} is a LoRA run: write its merged weights (lensforge "
                             "export --merge-lora) and start the new LoRA from them")
        if cfg.lora is not None:
            self.lora_info = LoraInfo(rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                                      targets=list(cfg.lora.targets), base=str(cfg.init_from),
                                      base_fingerprint=source_fingerprint(self.init))
        self.source = source = self._find_checkpoint(resume)  # the checkpoint resumed from, or None
        state = ckpt.load_trainer_state(source) if source else {}
        weights, adapters = self.init, None
        if source and cfg.lora is not None:
            adapters = ckpt.load_adapters(source, self.lora_info)
        elif source:
            weights = DenoiserSource("lensforge", (source / "model.safetensors",), "", self.spec)
        self.model = build_model(cfg, self.model_cfg, weights, adapters, self.d, self.bf16)
        self.fsdp = cfg.parallel.strategy == "fsdp" and self.d.enabled and self.d.world > 1
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optim = build_optimizer(self.model, cfg.optim, device)
        self.ema = EMA(self.model, cfg.ema.decay, cfg.ema.device, cfg.ema.every)  # trainable weights: from the start
        if source:
            ckpt.load_ema(source, self.ema, lora=cfg.lora is not None)
            ckpt.load_optimizer(source, self.model, self.optim)
        self.step = state.get("step", 0)
        if not state:  # the global stream (LoRA dropout) starts seeded; a resume restores it per rank below
            torch.manual_seed(seed_of(cfg.seed, "torch", self.d.rank))
        self.loader = self.make_loader(self._restore_rank(state))
        self.position = self.loader.state()
        self.flow = RectifiedFlow(prediction=self.model_cfg.prediction)
        self.val_batches = (holdout_batches(self.shards, cfg, cfg.val.samples, cfg.val.batch_size)
                            if cfg.val.every else [])
        self.grid = None
        if cfg.sample.every and self.d.main:
            s = cfg.sample
            self.grid = SampleGrid(self.run, self.spec, s.prompts, s.steps, s.cfg, s.seed, s.size, device)
        self.log = MetricsLog(self.run, self.d.main, cfg.max_steps, self.step, cfg.progress)
        self._write_config(data)
        if source:
            self.log.write("resume", self.step, checkpoint=str(source))
        elif self.init:
            self.log.write("init", 0, init_from=str(cfg.init_from), source=self.init.kind,
                           lora=cfg.lora.model_dump() if cfg.lora else None,
                           trainable=sum(p.numel() for p in self.params))

    # -- setup --------------------------------------------------------------------------------------------------
    def open_data(self, data, cfg: TrainConfig) -> TrainConfig:
        """Open the shard set; the config with the shards' codec and text encoder where the weights name none.
        Sets `data_id` (what checkpoints record the data as) and `text_date` (the chat date of the features).
        Another loop (training/rl.py: prompts, no shards) overrides this, `make_loader` and `describe_data`."""
        self.shards = open_shard_set(data, cfg, self.model_cfg, any_encoders=self.init is not None and (
            self.init.spec.codec is None or self.init.spec.text_encoder is None))
        self.data_id = str(self.shards.root)
        template = self.shards.encoders.get("text", {}).get("template") or {}  # the chat date GPT-OSS features had
        self.text_date = template.get("date")
        if cfg.codec != self.shards.encoders["codec"]["codec"] or \
                cfg.text_encoder != self.shards.encoders["text"]["text_encoder"]:  # a bare transformer: the shards'
            cfg = cfg.model_copy(update={"codec": self.shards.encoders["codec"]["codec"],
                                         "text_encoder": self.shards.encoders["text"]["text_encoder"]})
        return cfg

    def make_loader(self, state: dict | None):
        """What `next_batch` draws from (`.next_batch()`, `.state()`), at a saved position or fresh."""
        return Loader(self.shards, self.cfg, self.d.rank, self.d.world, state=state)

    def describe_data(self) -> tuple[dict, str]:
        """({fields for config.json}, the start line's words about the data)."""
        return ({"shard_set": self.data_id, "samples": self.shards.samples},
                f"{self.shards.samples:,} samples in {len(self.shards.buckets)} buckets ({self.shards.root})")

    def _find_checkpoint(self, resume: bool) -> Path | None:
        found = ckpt.complete_checkpoints(self.run)
        if found and not resume:
            raise ValueError(f"{self.run} already has checkpoints (latest {found[-1].name}): pass --resume to "
                             "continue it, or choose another --out")
        if self.d.main:
            ckpt.remove_incomplete(self.run)
        if resume and not found and self.d.main:
            print(f"train: --resume: no checkpoint in {self.run}, starting from step 0")
        return found[-1] if resume and found else None

    def _restore_rank(self, state: dict) -> dict | None:
        """This rank's data position (and RNG states) from a trainer state; None to start fresh."""
        if not state:
            return None
        if state.get("shard_set") != self.data_id and self.d.main:
            print(f"train: the checkpoint was trained on {state.get('shard_set')}, this run reads "
                  f"{self.data_id}: its data positions may not mean the same samples")
        if state.get("world_size") != self.d.world:
            if self.d.main:
                print(f"train: resuming {state.get('world_size')} ranks' data positions on {self.d.world} ranks: "
                      "the data order restarts (weights, optimizer and step are exact)")
            return {"step": state["step"]}
        mine = state["ranks"][self.d.rank]
        ckpt.set_rng_state(mine["rng"], self.device)
        return mine["data"]

    def _write_config(self, data) -> None:
        if not self.d.main:
            return
        self.run.mkdir(parents=True, exist_ok=True)
        fields, words = self.describe_data()
        resolved = {"train": self.cfg.model_dump(mode="json"), "model": self.model_cfg.model_dump(mode="json"),
                    "init_from": {"path": self.cfg.init_from, "kind": self.init.kind,
                                  "files": [str(f) for f in self.init.files]} if self.init else None,
                    "lora": self.lora_info.model_dump() if self.lora_info else None,
                    "data": str(data), **fields, "world_size": self.d.world, "device": str(self.device),
                    "bf16": self.bf16}
        write_json(self.run / "config.json", resolved)
        trainable, total = sum(p.numel() for p in self.params), sum(p.numel() for p in self.model.parameters())
        start = f", from {self.init.kind} {self.cfg.init_from}" if self.init else ""
        tuned = f", LoRA r {self.cfg.lora.rank}: {trainable:,} of {total:,} parameters train" if self.cfg.lora else ""
        print(f"train: {words}; model {self.model_cfg.name}{start}{tuned}, {self.d.world} rank(s) on {self.device}, "
              f"{'bf16' if self.bf16 else 'fp32'}, from step {self.step} → {self.cfg.max_steps}")

    # -- one step -----------------------------------------------------------------------------------------------
    def train_step(self, batch, step: int) -> dict:
        """Forward, backward, clip and (unless anything is non-finite on any rank) update. `step` counts from 1."""
        device = self.device
        x0 = batch.latents.to(device, non_blocking=True).float()
        text = batch.text.to(device, non_blocking=True).float()
        mask = batch.mask.to(device, non_blocking=True)
        generator = torch.Generator(device=device).manual_seed(seed_of(self.cfg.seed, "noise", self.d.rank, step))
        lr = self.set_lr(step)
        with autocast(device, self.bf16, self.fsdp):
            loss = self.flow.loss(self.model, x0, text, mask, generator=generator).mean()
        loss.backward()
        norm = grad_norm_and_clip(self.params, self.cfg.optim.grad_clip)
        image_tokens = x0.shape[-2] * x0.shape[-1] // self.model_cfg.patch**2
        flops = train_flops(self.model_cfg, x0.shape[0], image_tokens, text.shape[1], frozen=self.cfg.lora is not None)
        return self.apply_update(loss, norm, x0.shape[0], x0.shape[0] * image_tokens, step, lr, batch.bucket,
                                 {"flops": flops})

    def set_lr(self, step: int) -> float:
        """The schedule's LR for `step` (from 1), set on every parameter group."""
        lr = lr_at(self.cfg, step)
        for group in self.optim.param_groups:
            group["lr"] = lr
        return lr

    def apply_update(self, loss: torch.Tensor, norm: torch.Tensor, samples: int, tokens: int, step: int, lr: float,
                     bucket: str, extra: dict[str, float]) -> dict:
        """Sum the step's figures over ranks; unless anything is non-finite on any rank, step AdamW and the EMA.
        `extra`: further figures, returned averaged over ranks (the FLOPs, distill's loss terms)."""
        names = ["loss", "bad", "grad_norm", "samples", "tokens", *extra]
        local = [float(loss.detach()), float(not torch.isfinite(loss.detach())), float(norm), samples, tokens,
                 *extra.values()]
        total = dict(zip(names, all_reduce(local, self.d, self.device)))
        world = self.d.world
        finite = total["bad"] == 0 and math.isfinite(total["grad_norm"])
        if finite:
            self.optim.step()
            self.ema.update(step)
        self.optim.zero_grad(set_to_none=True)
        return {"loss": total["loss"] / world, "grad_norm": total["grad_norm"] / world, "lr": lr,
                "finite": bool(finite), "samples": total["samples"], "tokens": total["tokens"], "bucket": bucket,
                **{name: total[name] / world for name in extra}}

    # -- the loop -----------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, d = self.cfg, self.d
        cuda = self.device.type == "cuda"
        # On 2 CPU cores a loader thread cost 0.13 s of a 0.46 s tiny step (GIL and the step's OpenMP threads),
        # 5× what it saved; with an accelerator the host is idle during the step and the thread hides the load.
        batches = prefetch(self.loader, cfg.data.prefetch, pin_memory=True) if cuda and cfg.data.prefetch and \
            isinstance(self.loader, Loader) else inline(self.loader)
        window = Window()
        bad_run: list[int] = []
        found = ckpt.complete_checkpoints(self.run)
        last_ckpt = found[-1] if found else None
        self.model.train()
        try:
            while self.step < cfg.max_steps:
                tick = time.perf_counter()
                batch = self.next_batch(batches)
                waited = time.perf_counter() - tick
                step = self.step + 1
                out = self.train_step(batch, step)
                self.step, self.position = step, batch.position
                window.add(out, waited, time.perf_counter() - tick)  # logging, checkpoints, val: not counted
                if not out["finite"]:
                    bad_run.append(step)
                    self.log.write("skip", step, loss=out["loss"], grad_norm=out["grad_norm"], bucket=out["bucket"])
                    if len(bad_run) >= cfg.max_bad_steps:
                        self._stop(bad_run, last_ckpt)
                else:
                    bad_run = []
                self.log.advance(out["loss"] if out["finite"] else None, window.samples_per_s())
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    self.log.write("train", step, **window.summary(self), mem_gb=round(memory_gb(self.device), 3))
                    window = Window()
                if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                    last_ckpt = self.save()
                if cfg.val.every and (step % cfg.val.every == 0 or step == cfg.max_steps):
                    self.validate()
                if cfg.sample.every and (step % cfg.sample.every == 0 or step == cfg.max_steps):
                    self.sample()
        finally:
            batches.close()
            self.log.close()
        return {"step": self.step, "checkpoint": str(last_ckpt) if last_ckpt else None}

    def next_batch(self, batches):
        """What one step consumes: one batch (a distill step takes several, training/distill.py)."""
        return next(batches)

    def _stop(self, bad: list[int], last: Path | None) -> None:
        where = f"the last good checkpoint, {last}, is intact" if last else "no checkpoint was written yet"
        message = (f"training stopped: {len(bad)} non-finite losses or gradients in a row "
                   f"(steps {bad[0]}–{bad[-1]}); {where}. Lower optim.lr, raise optim.warmup_steps, or check the data.")
        self.log.write("stop", bad[-1], reason=message)
        raise TrainingStopped(message)

    def save(self) -> Path | None:
        rank_state = {"rank": self.d.rank, "data": self.position, "rng": ckpt.rng_state(self.device)}
        extra = {"config": self.cfg.model_dump(mode="json"), "shard_set": self.data_id}
        path = ckpt.save(self.run, self.step, self.model, self.optim, self.ema, self.spec, rank_state, extra,
                         self.d, self.cfg.keep_checkpoints, self.lora_info, more=self.save_more)
        self.log.write("checkpoint", self.step, path=str(path))
        return path

    def save_more(self, step_dir: Path) -> None:
        """Further state a subclass checkpoints (every rank calls it, inside the step's temporary directory)."""

    def validate(self) -> None:
        context = autocast(self.device, self.bf16, self.fsdp)
        result = validation_loss(self.model, self.flow, self.val_batches, self.cfg.val.timesteps, self.device,
                                 context, self.cfg.seed)
        self.log.write("val", self.step, **result)

    def sample(self) -> None:
        weights = self.ema.full_state()  # a collective under FSDP
        if self.cfg.lora is not None:  # the frozen base with the EMA adapters merged
            base = gather_full({plain_name(n): p for n, p in self.model.named_parameters() if not p.requires_grad})
            weights = lora.merged_state(base, lora.adapter_state(weights), self.cfg.lora)
        if self.grid is not None:
            path = self.grid.render(self.step, weights)
            self.log.write("sample", self.step, path=str(path))
        self.d.barrier()


def encoders_from_init(cfg: TrainConfig, init: DenoiserSource | None, main: bool) -> TrainConfig:
    """The codec and text encoder a run starting from `init` uses: those it names (a release root, a lensforge
    checkpoint), unless the config sets its own; a bare transformer names none and takes the shards'."""
    if init is None:
        return cfg
    update = {}
    for field, named in ("codec", init.spec.codec), ("text_encoder", init.spec.text_encoder):
        if named is None or field in cfg.model_fields_set:
            if named is not None and getattr(cfg, field) != named and main:
                print(f"train: train.{field} {getattr(cfg, field)!r} replaces init_from's {named!r}")
            continue
        update[field] = named
    return cfg.model_copy(update=update)


class Window:
    """Sums over the steps since the last `train` record."""

    def __init__(self):
        self.steps = self.finite = 0
        self.loss = self.norm = self.samples = self.tokens = self.flops = self.wait = self.time = 0.0
        self.lr = 0.0
        self.terms: dict[str, float] = {}  # a step's further named losses (distill's), summed over finite steps
        self.totals: dict[str, float] = {}  # running totals (the RL judge's spend): the latest step's

    def add(self, out: dict, waited: float, took: float) -> None:
        self.steps += 1
        self.samples, self.tokens, self.flops = self.samples + out["samples"], self.tokens + out["tokens"], \
            self.flops + out["flops"]
        self.wait, self.time, self.lr = self.wait + waited, self.time + took, out["lr"]
        if out["finite"]:
            self.finite += 1
            self.loss, self.norm = self.loss + out["loss"], self.norm + out["grad_norm"]
            for name, value in out.get("terms", {}).items():
                self.terms[name] = self.terms.get(name, 0.0) + value
        self.totals.update(out.get("totals", {}))

    def samples_per_s(self) -> float:
        return self.samples / self.time if self.time else 0.0

    def summary(self, trainer: Trainer) -> dict:
        n, t = max(self.finite, 1), max(self.time, 1e-9)
        tflops = self.flops / t / 1e12
        peak = trainer.cfg.peak_tflops
        return {"loss": self.loss / n if self.finite else None, "grad_norm": self.norm / n if self.finite else None,
                "lr": self.lr, "samples_per_s": round(self.samples / t, 3), "tokens_per_s": round(self.tokens / t, 1),
                "data_wait": round(self.wait / t, 4), "step_s": round(t / self.steps, 4),
                "tflops": round(tflops, 4), "mfu": round(tflops / peak, 4) if peak else None,
                "skipped": self.steps - self.finite,
                **{name: value / n for name, value in self.terms.items()}, **self.totals}


def train(cfg: TrainConfig, data: str | Path, out: str | Path, resume: bool = False) -> dict:
    """Set up the process group (if torchrun started us), train, tear down."""
    from training.parallel import close_distributed

    try:
        return Trainer(cfg, data, out, resume=resume).fit()
    finally:
        close_distributed()
