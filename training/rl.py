"""Lens-RL's post-training: DiffusionNFT on the model's own rollouts, scored by a rule reward or a rubric judge.

    lensforge rl --init runs/demo --prompts prompts.jsonl --out runs/rl --reward scenes --config docs/rl/tiny.yaml
    torchrun --nproc-per-node 8 -m pipelines.cli rl --init /models/Lens --prompts prompts.txt --out runs/lens-rl \\
        --reward judge --config configs/lens-rl.yaml

The `RLTrainer` is the trainer (training/trainer.py) with prompts in place of shards and another step: its model
is the policy (full, or peft LoRA adapters on the frozen weights), with the trainer's optimizer, EMA, checkpoints
(exact resume), metrics and DDP / FSDP2 from outside. One step, on every rank:

1. `rollout.prompts` prompts drawn for (seed, rank, step), `rollout.images` images each, sampled by the sampling
   policy θ_old through inference's pipeline (`Pipeline.latents`: the noise, schedule and CFG of `lensforge
   generate`) and decoded;
2. rewards (`scenes`: the rule, 0/1; `judge`: the rubric's share of yes, training/rl_judge.py) → the optimality
   r = ½ + ½·clip((raw − the prompt's mean) / Z, −1, 1), Z the centred rewards' spread over every rank;
3. on the clean rollouts, noised afresh (t ~ U[t_min, t_max]): DiffusionNFT's loss on v_new (with gradients) and
   v_old (θ_old's), plus `kl`·‖v_new − v_ref‖² to the frozen reference (the initial weights: for LoRA the same
   model with its adapters off), summed over micro-batches into one AdamW step;
4. θ_old ← η·θ_old + (1 − η)·θ with η = min(old.ramp·step, old.max) (DiffusionNFT's soft update).

θ_old is an `EMA` of the trainable weights (the adapters, for LoRA) that the model wears for the rollouts and the
v_old pass; checkpoints add it as rl/old.safetensors. Every draw is seeded by (seed, rank, step), so a resumed run
repeats the uninterrupted one. A checkpoint's spec records the rollouts' steps and CFG as `generate`'s defaults:
the policy that was optimised is that sampler.
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from inference.checkpoint import SamplingDefaults, write_safetensors
from inference.codecs import load_codec
from inference.flow import pad_text
from inference.generate import Pipeline, text_spec_with_layers, to_pil
from inference.text import load_text_encoder
from training.distill import frozen_model
from training.distill_losses import noised
from training.ema import EMA, local
from training.loader import seed_of
from training.metrics import forward_flops
from training.parallel import Dist, all_reduce, autocast
from training.rl_config import RLConfig
from training.rl_losses import Z_FLOOR, centred, flat_prompts, kl_to_reference, nft_loss, optimality
from training.rl_prompts import RLPrompt, SceneReward, read_prompts
from training.trainer import Trainer, grad_norm_and_clip

STATE_DIR, OLD = "rl", "old.safetensors"  # in each step directory: the sampling policy's trainable weights


@dataclass
class PromptBatch:
    """The prompts of one step; `position` is the stream's state after it (what a checkpoint resumes from)."""

    prompts: list[RLPrompt]
    position: dict
    bucket: str


class PromptStream:
    """`per_step` prompts a step, drawn without replacement for (seed, rank, step): a resume needs only the step."""

    def __init__(self, prompts: list[RLPrompt], per_step: int, seed: int, rank: int, size: int,
                 state: dict | None = None):
        self.prompts, self.per_step, self.seed, self.rank = prompts, per_step, seed, rank
        self.bucket = f"{size}x{size}"
        self.step = (state or {}).get("step", 0)

    def state(self) -> dict:
        return {"step": self.step}

    def next_batch(self) -> PromptBatch:
        self.step += 1
        rng = random.Random(seed_of(self.seed, "prompts", self.rank, self.step))
        picks = [rng.randrange(len(self.prompts)) for _ in range(self.per_step)] \
            if self.per_step > len(self.prompts) else rng.sample(range(len(self.prompts)), self.per_step)
        return PromptBatch([self.prompts[i] for i in picks], self.state(), self.bucket)


def make_reward(cfg: RLConfig, run: Path, d: Dist):
    if cfg.reward == "scenes":
        return SceneReward()
    from training.rl_judge import JudgeReward

    return JudgeReward(cfg.judge, run, d.rank, d.world)


@contextlib.contextmanager
def wearing(ema: EMA):
    """The model's trainable weights replaced by `ema`'s for the block (each rank its own shards), then restored."""
    names = list(ema.shadow)
    with torch.no_grad():
        saved = [local(ema.params[n]).detach().clone() for n in names]
        for n in names:
            local(ema.params[n]).copy_(ema.shadow[n])
    try:
        yield
    finally:
        with torch.no_grad():
            for n, value in zip(names, saved):
                local(ema.params[n]).copy_(value)


@contextlib.contextmanager
def adapters_off(model: torch.nn.Module):
    """A peft-LoRA model as its frozen base for the block (the reference of a LoRA run)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)  # peft: the adapters train again


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The MMDiT inside DDP (FSDP2 shards the module in place: it is the model)."""
    return getattr(model, "module", model)


class RLTrainer(Trainer):
    cfg: RLConfig

    def __init__(self, cfg: RLConfig, out: str | Path, resume: bool = False, d: Dist | None = None):
        if not cfg.prompts:
            raise ValueError("rl.prompts: give the prompt file (--prompts FILE)")
        super().__init__(cfg, cfg.prompts, out, resume=resume, d=d)
        cfg, d, device = self.cfg, self.d, self.device
        self.spec = self.spec.model_copy(update={"sampling": SamplingDefaults(steps=cfg.rollout.steps,
                                                                              cfg=cfg.rollout.cfg)})
        compute = torch.bfloat16 if self.bf16 else torch.float32
        text = load_text_encoder(text_spec_with_layers(self.spec), device=device, dtype=compute,
                                 date=self.spec.text_date)
        self.pipe = Pipeline(unwrapped(self.model), load_codec(self.spec.codec, device=device, dtype=compute), text,
                             device=device, autocast=torch.bfloat16 if self.bf16 else None)
        self.size = cfg.rollout.size or self.model_cfg.base_size
        self.pipe.codec.check_size(self.size, self.size)
        self.neg = self.pipe.encode([""])[0] if cfg.rollout.cfg != 1.0 else None
        self.old = EMA(self.model, 0.0)  # θ_old: starts at θ
        if self.source is not None:
            self.old.load_full_state(load_file(str(self.source / STATE_DIR / OLD)))
        self.reference = None
        if cfg.kl and cfg.lora is None:
            self.reference = frozen_model(cfg.model_copy(update={"lora": None}), self.init, d, self.bf16)
        self.image_tokens = (self.size // self.pipe.codec.factor // self.model_cfg.patch) ** 2
        if d.main:
            r = cfg.rollout
            print(f"rl: {len(self.prompt_list)} prompts, {cfg.reward} reward; {r.prompts} prompts × {r.images} "
                  f"images a step and rank, {r.steps} steps, CFG {r.cfg:g}, {self.size}²; β {cfg.beta:g}, KL "
                  f"{cfg.kl:g}{' (adapters off)' if cfg.kl and cfg.lora else ''}")

    def fit(self) -> dict:
        try:
            return super().fit()
        finally:
            self.reward.close()  # the judge's journal

    # -- the trainer's data hooks: prompts, no shards -----------------------------------------------------------
    def open_data(self, data, cfg: RLConfig) -> RLConfig:
        spec = self.init.spec
        for field, named in ("codec", spec.codec), ("text_encoder", spec.text_encoder):
            if named is None and field not in cfg.model_fields_set:
                raise ValueError(f"rl.init {cfg.init} is a bare transformer that names no {field}: set "
                                 f"rl.{field} (e.g. --set rl.codec=flux2:LENS_DIR/vae)")
        self.prompt_list = read_prompts(data)
        self.reward = make_reward(cfg, self.run, self.d)
        self.reward.check(self.prompt_list)  # before any rollout
        self.data_id, self.text_date = str(Path(data).resolve()), spec.text_date
        return cfg

    def make_loader(self, state: dict | None) -> PromptStream:
        return PromptStream(self.prompt_list, self.cfg.rollout.prompts, self.cfg.seed, self.d.rank,
                            self.cfg.rollout.size or self.model_cfg.base_size, state)

    def describe_data(self) -> tuple[dict, str]:
        return ({"prompts": self.data_id, "prompt_count": len(self.prompt_list), "reward": self.cfg.reward},
                f"{len(self.prompt_list):,} prompts ({self.data_id}), {self.cfg.reward} reward")

    # -- one step -----------------------------------------------------------------------------------------------
    def _context(self):
        return autocast(self.device, self.bf16, self.fsdp)

    def _velocity(self, x, t, text, mask) -> torch.Tensor:
        return self.flow.velocity(self.model(x, t, text, mask), x, t).float()

    def _reference_velocity(self, x, t, text, mask) -> torch.Tensor:
        """The frozen initial model's velocity: the reference copy, or for LoRA the policy with its adapters off."""
        if self.reference is not None:
            return self.flow.velocity(self.reference(x, t, text, mask), x, t).float()
        with adapters_off(self.model):
            return self._velocity(x, t, text, mask)

    def rollouts(self, batch: PromptBatch, step: int) -> tuple[list[RLPrompt], torch.Tensor, torch.Tensor,
                                                                torch.Tensor]:
        """(prompt of each rollout, x0 (N, C, h, w), text (N, L, D), mask (N, L)) sampled by θ_old, N =
        prompts × images, a prompt's images together."""
        r = self.cfg.rollout
        encoded = self.pipe.encode([p.text for p in batch.prompts])
        texts = [e for e in encoded for _ in range(r.images)]
        prompts = [p for p in batch.prompts for _ in range(r.images)]
        seeds = [seed_of(self.cfg.seed, "rollout", self.d.rank, step, i) for i in range(len(prompts))]
        latents = []
        self.model.eval()
        with wearing(self.old):
            for start in range(0, len(prompts), r.batch_size):
                part = slice(start, start + r.batch_size)
                latents.append(self.pipe.latents([p.text for p in prompts[part]], self.size, self.size, r.steps,
                                                 r.cfg, seeds[part], texts=texts[part], neg=self.neg).float())
        self.model.train()
        text, mask = pad_text([t for t, _ in texts], [m for _, m in texts])
        self._flops += forward_flops(self.model_cfg, self.image_tokens, text.shape[1]) * len(prompts) * r.steps * \
            (1 if r.cfg == 1.0 else 2)
        return prompts, torch.cat(latents), text.float(), mask

    def rewards(self, prompts: list[RLPrompt], x0: torch.Tensor, step: int) -> torch.Tensor:
        images = []
        with torch.no_grad(), self.pipe._context():  # the codec's own autocast (its weights are in `compute`)
            for start in range(0, len(x0), self.cfg.rollout.batch_size):
                images += to_pil(self.pipe.codec.decode(x0[start:start + self.cfg.rollout.batch_size]),
                                 self.pipe.codec.rounding)
        return torch.tensor(self.reward.score(prompts, images, step), dtype=torch.float64)

    def train_step(self, batch: PromptBatch, step: int) -> dict:
        cfg, r = self.cfg, self.cfg.rollout
        self._flops = 0.0
        lr = self.set_lr(step)
        prompts, x0, text, mask = self.rollouts(batch, step)
        raw = self.rewards(prompts, x0, step)
        groups = torch.arange(len(batch.prompts)).repeat_interleave(r.images)
        spread = centred(raw, groups)
        total_sq, count = all_reduce([float(spread.pow(2).sum()), len(raw)], self.d, self.device)
        z = max(math.sqrt(total_sq / count), Z_FLOOR)  # every rank's rollouts: one scale
        optimal, _ = optimality(raw, groups, z)
        optimal = optimal.to(self.device)
        gen = torch.Generator(device=self.device).manual_seed(seed_of(cfg.seed, "rl", self.d.rank, step))
        n, nft_sum, kl_sum = len(prompts), 0.0, 0.0
        parts = [slice(start, start + cfg.train_batch) for start in range(0, n, cfg.train_batch)]
        noised_parts = []  # per micro-batch (x_t, t): drawn in order, t then ε, from the step's generator
        for part in parts:
            t = cfg.t_min + (cfg.t_max - cfg.t_min) * torch.rand(x0[part].shape[0], generator=gen, device=self.device)
            noised_parts.append((noised(x0[part], t, torch.randn(x0[part].shape, generator=gen, device=self.device)),
                                 t))
        with torch.no_grad(), self._context():  # θ_old worn once for the whole step, not per micro-batch
            with wearing(self.old):
                v_old = [self._velocity(x_t, t, text[part], mask[part]) for part, (x_t, t) in zip(parts, noised_parts)]
            v_ref = [self._reference_velocity(x_t, t, text[part], mask[part]) if cfg.kl else None
                     for part, (x_t, t) in zip(parts, noised_parts)]
        per_forward = forward_flops(self.model_cfg, self.image_tokens, text.shape[1])
        for part, (x_t, t), old, ref in zip(parts, noised_parts, v_old, v_ref):
            with self._context():
                v_new = self._velocity(x_t, t, text[part], mask[part])
            nft = nft_loss(v_new, old, x_t, t, x0[part], optimal[part], cfg.beta)
            kl = kl_to_reference(v_new, ref) if ref is not None else torch.zeros_like(nft)
            ((nft.sum() + cfg.kl * kl.sum()) / n).backward()
            nft_sum, kl_sum = nft_sum + float(nft.detach().sum()), kl_sum + float(kl.detach().sum())
            self._flops += per_forward * len(t) * (5 + bool(cfg.kl))  # old, new (+ its backward: ×3), reference
        loss = torch.tensor((nft_sum + cfg.kl * kl_sum) / n)
        norm = grad_norm_and_clip(self.params, cfg.optim.grad_clip)
        world = self.d.world  # the judge's figures are sums over ranks: apply_update averages its extras
        figures = {"flops": self._flops, "nft": nft_sum / n, "kl": kl_sum / n, "reward": float(raw.mean()),
                   "reward_std": float(raw.std(unbiased=False)), "flat": flat_prompts(raw, groups), "z": z,
                   **{name: value * world for name, value in self.reward.last.items()}}
        out = self.apply_update(loss, norm, n, n * self.image_tokens, step, lr, batch.bucket, figures)
        if out["finite"]:
            self.old.decay = min(cfg.old.ramp * step, cfg.old.max)
            self.old.update(step)
        totals = {name: out.pop(name) for name in list(out) if name.endswith("_total")}
        terms = {name: out.pop(name) for name in list(figures) if name != "flops" and name in out}
        return {**out, "terms": terms, "totals": totals}

    # -- checkpoints --------------------------------------------------------------------------------------------
    def save_more(self, step_dir: Path) -> None:
        old = self.old.full_state()  # a collective under FSDP
        if self.d.main:
            write_safetensors(step_dir / STATE_DIR / OLD, old, {})
        self.d.barrier()


def rl(cfg: RLConfig, out: str | Path, resume: bool = False) -> dict:
    """Set up the process group (if torchrun started us), post-train, tear down."""
    from training.parallel import close_distributed

    try:
        return RLTrainer(cfg, out, resume=resume).fit()
    finally:
        close_distributed()
