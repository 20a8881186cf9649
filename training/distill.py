"""Lens-Turbo's distillation: a few-step student without CFG from a teacher, with DMD2 and an adversarial branch.

    lensforge distill --teacher runs/demo --data data --out runs/turbo --config docs/distill/tiny.yaml
    torchrun --nproc-per-node 8 -m pipelines.cli distill --teacher /models/Lens --data data --out runs/turbo \\
        --config configs/lens-turbo.yaml

The `Distiller` is the trainer (training/trainer.py) with another step: the student is the trainer's model,
started from the teacher (`init_from`), with its optimizer, EMA, bucketed loader, checkpoints, metrics and sample
grids; beside it sit the frozen teacher, the fake score (its own AdamW, and an EMA that the DMD term reads) and
the discriminator head on the teacher's features (training/distill_disc.py). One step takes `fake.updates + 1`
batches: one fake-score / discriminator update on each of the first ones (TTUR), then one student update.

The student: x̂0 = G(x_k, σ_k) at a step k of its schedule (Lens's shifted σ for `student_steps`), where x_k comes
from running G itself from noise for k Euler steps (backward simulation), exactly as `lensforge generate --steps 4`
samples it. The student's loss: DMD (fake − conditional teacher) + the decoupled CFG term (guidance w) + λ_g·GAN,
each logged (distill_losses.py). The critics' loss: the fake score's flow loss on the student's samples +
λ_d·(non-saturating discriminator loss + approximate R1). Every random draw comes from a generator seeded by
(seed, rank, step, update), so a resumed run repeats the uninterrupted one.

A checkpoint is the trainer's (the student: what `generate`, `evaluate` and `export` read; its spec records
`sampling: {steps: student_steps, cfg: 1}`) plus `distill/` with the fake score, its EMA, the head and their
optimizers.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from inference.checkpoint import DenoiserSource, SamplingDefaults, load_source, save_weights, write_safetensors
from inference.flow import sigma_schedule
from training import train_checkpoint as ckpt
from training.distill_config import DistillConfig
from training.distill_disc import DiscHead, FeatureTap
from training.distill_losses import approx_r1, decoupled_dmd, discriminator_loss, dmd_loss, generator_gan_loss, \
    noised, perturbed, x0_from_v
from training.ema import local
from training.loader import Batch, seed_of
from training.metrics import forward_flops
from training.model_init import build_model
from training.parallel import Dist, all_reduce, autocast
from training.trainer import Trainer, build_optimizer, grad_norm_and_clip

STATE_DIR = "distill"  # in each step directory
FAKE, FAKE_EMA, DISC = "fake.safetensors", "fake_ema.safetensors", "disc.safetensors"
FAKE_OPTIM, DISC_OPTIM = "fake_optimizer", "disc_optimizer"


@dataclass
class Group:
    """The batches one distill step consumes; the loader's position after the last one."""

    batches: list[Batch]

    @property
    def position(self) -> dict:
        return self.batches[-1].position

    @property
    def bucket(self) -> str:
        return self.batches[-1].bucket


def frozen_model(cfg: DistillConfig, source: DenoiserSource, d: Dist, bf16: bool,
                 backward: bool = False) -> torch.nn.Module:
    """A model that never trains (the teacher, the fake score's EMA): sharded like the others under FSDP,
    otherwise whole on the device and outside DDP (which refuses a model with nothing to train).

    `backward`: gradients flow through it to its input (the teacher under the GAN term). FSDP2 does not gather a
    frozen module's weights again for the backward, so such a model keeps them gathered after its forward until
    `release` (its bf16 weights whole on each GPU meanwhile: 7.6 GB for lens-3.8b)."""
    if cfg.parallel.strategy == "fsdp" and d.enabled and d.world > 1:
        if backward:
            cfg = cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={"reshard_after_forward": False})})
        model = build_model(cfg, source.spec.model, source, None, d, bf16)
    else:
        model = load_source(source, dtype=None if bf16 else torch.float32).to(d.device)
    return model.requires_grad_(False).eval()


def release(model: torch.nn.Module) -> None:
    """Free the gathered weights of a model `frozen_model(..., backward=True)` built under FSDP (else nothing)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def resumable(saved: Path, name: str) -> Path:
    """A file of the checkpoint's `distill/`, or a one-line error saying why a resume cannot use it."""
    path = saved / name
    if not path.exists():
        raise ValueError(f"{saved.parent}: no {STATE_DIR}/{name}: it was written with other distill settings "
                         "(fake.ema, losses.gan) or by `lensforge train`; resume with the config it was made with")
    return path


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{plain name: full tensor on the CPU}, whatever wraps the model (a collective under FSDP)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class Distiller(Trainer):
    cfg: DistillConfig

    def __init__(self, cfg: DistillConfig, data: str | Path, out: str | Path, resume: bool = False,
                 d: Dist | None = None):
        super().__init__(cfg, data, out, resume=resume, d=d)
        cfg, d, device = self.cfg, self.d, self.device
        self.spec = self.spec.model_copy(update={"sampling": SamplingDefaults(steps=cfg.student_steps, cfg=1.0)})
        self.score_spec = self.spec.model_copy(update={"sampling": None})
        whole = cfg.model_copy(update={"lora": None})  # the fake score trains all its weights
        saved = self.source / STATE_DIR if self.source else None

        def from_saved(name: str) -> DenoiserSource:
            if saved is None:
                return self.init
            return DenoiserSource("lensforge", (resumable(saved, name),), "", self.score_spec)

        self.teacher = frozen_model(whole, self.init, d, self.bf16, backward=cfg.needs_disc())
        self.fake = build_model(whole, self.model_cfg, from_saved(FAKE), None, d, self.bf16)
        self.fake_params = [p for p in self.fake.parameters() if p.requires_grad]
        self.fake_optim = build_optimizer(self.fake, cfg.optim.model_copy(update={"lr": cfg.fake.lr}), device)
        self.fake_ema = frozen_model(whole, from_saved(FAKE_EMA), d, self.bf16) if cfg.fake.ema else None
        self.tap = self.head = self.disc_optim = None
        if cfg.needs_disc():
            self.tap = FeatureTap(self.teacher, self.model_cfg.depth // 2 if cfg.disc.block is None else
                                  cfg.disc.block)
            with torch.random.fork_rng(devices=[]):  # a resume has restored the global RNG: leave it as it is
                torch.manual_seed(seed_of(cfg.seed, "disc"))
                self.head_plain = DiscHead(self.model_cfg.hidden)
            if saved is not None:
                self.head_plain.load_state_dict(load_file(str(resumable(saved, DISC))))
            self.head_plain.to(device)
            self.head = self.head_plain
            if d.enabled and d.world > 1:
                from torch.nn.parallel import DistributedDataParallel

                self.head = DistributedDataParallel(self.head_plain, device_ids=[device.index] if device.type ==
                                                    "cuda" else None)
            self.disc_optim = torch.optim.AdamW(self.head_plain.parameters(), lr=cfg.disc.lr, betas=cfg.disc.betas,
                                                weight_decay=0.0)
        if saved is not None:
            ckpt.load_optimizer(saved, self.fake, self.fake_optim, FAKE_OPTIM)
            if self.disc_optim is not None:
                ckpt.load_optimizer(saved, self.head, self.disc_optim, DISC_OPTIM)
        self.patch = self.model_cfg.patch
        if d.main:
            on = [f"{k} {v:g}" for k, v in cfg.losses.model_dump().items() if v]
            print(f"distill: teacher {cfg.teacher} → a {cfg.student_steps}-step student; losses {', '.join(on)}; "
                  f"{cfg.fake.updates} fake-score updates per student update, fake EMA μ {cfg.fake.ema:g}")

    # -- pieces -------------------------------------------------------------------------------------------------
    def next_batch(self, batches) -> Group:
        return Group([next(batches) for _ in range(self.cfg.fake.updates + 1)])

    def _context(self):
        return autocast(self.device, self.bf16, self.fsdp)

    def _generator(self, step: int, update: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed_of(self.cfg.seed, "distill", self.d.rank,
                                                                        step, update))

    def _inputs(self, batch: Batch):
        x0 = batch.latents.to(self.device, non_blocking=True).float()
        text = batch.text.to(self.device, non_blocking=True).float()
        mask = batch.mask.to(self.device, non_blocking=True)
        tokens = x0.shape[-2] * x0.shape[-1] // self.patch**2
        self._batch = x0.shape[0]
        self._flops_per = forward_flops(self.model_cfg, tokens, text.shape[1]) * x0.shape[0]  # one batch forward
        return x0, text, mask, tokens

    def _timesteps(self, b: int, tokens: int, gen: torch.Generator) -> torch.Tensor:
        """(B,) DMD / fake-score t: the training distribution (shifted logit-normal), clamped."""
        t = self.flow.sample_t(b, tokens, generator=gen, device=self.device)
        return t.clamp(self.cfg.fake.t_min, self.cfg.fake.t_max)

    def _velocity(self, model, x, t, text, mask) -> torch.Tensor:
        return self.flow.velocity(model(x, t, text, mask), x, t).float()

    def student_x0(self, x0_real, text, mask, tokens: int, gen: torch.Generator, grad: bool) -> torch.Tensor:
        """(B, C, H, W) the student's x̂0 from step k (drawn) of its schedule, with or without its graph."""
        steps = self.cfg.student_steps
        sigmas = sigma_schedule(steps, tokens).to(self.device)  # what generate --steps S uses at this size
        k = torch.randint(steps, (1,), generator=gen, device=self.device)
        if self.d.enabled:  # rank 0's k everywhere: under FSDP each pass is a collective, so all run as many
            dist.broadcast(k, src=0)
        k = int(k)
        noise = torch.randn(x0_real.shape, generator=gen, device=self.device)
        b = x0_real.shape[0]

        def t_at(i):  # the timestep the sampler gives the model (inference/flow.py)
            return (sigmas[i] * 1000).expand(b) / 1000

        if self.cfg.backward_simulation:
            x = noise
            with torch.no_grad(), self._context():
                for i in range(k):
                    x = x + (sigmas[i + 1] - sigmas[i]) * self._velocity(self.model, x, t_at(i), text, mask)
        else:
            x = noised(x0_real, sigmas[k].expand(b), noise)
        with torch.set_grad_enabled(grad), self._context():
            x0 = x0_from_v(x, t_at(k), self._velocity(self.model, x, t_at(k), text, mask))
        self._flops += self._flops_per * (k + (3 if grad else 1))
        return x0

    def _features(self, x, t, text, mask) -> torch.Tensor:
        with torch.no_grad(), self._context():
            self.teacher(x, t, text, mask)
        release(self.teacher)
        self._flops += self._flops_per * x.shape[0] / self._batch
        return self.tap.take()

    # -- one step -----------------------------------------------------------------------------------------------
    def train_step(self, group: Group, step: int) -> dict:
        self._flops = 0.0
        terms: dict[str, float] = defaultdict(float)
        finite = True
        for i, batch in enumerate(group.batches[:-1]):
            finite &= self.critic_step(batch, step, i, terms)
        out = self.student_step(group.batches[-1], step, terms)
        out["finite"] = out["finite"] and finite
        return out

    def critic_step(self, batch: Batch, step: int, update: int, terms: dict) -> bool:
        """One update of the fake score (and the discriminator) on the student's current samples."""
        cfg = self.cfg
        x0_real, text, mask, tokens = self._inputs(batch)
        gen, b = self._generator(step, update), x0_real.shape[0]
        x0_gen = self.student_x0(x0_real, text, mask, tokens, gen, grad=False)
        t = self._timesteps(b, tokens, gen)
        eps = torch.randn(x0_gen.shape, generator=gen, device=self.device)
        with self._context():
            fake_loss = self.flow.loss(self.fake, x0_gen, text, mask, t=t, noise=eps).mean()
        self._flops += 3 * self._flops_per
        loss, values = fake_loss, {"fake": float(fake_loss.detach())}
        if self.head is not None:
            td = self._timesteps(b, tokens, gen)
            x_real = noised(x0_real, td, torch.randn(x0_real.shape, generator=gen, device=self.device))
            x_fake = noised(x0_gen, td, torch.randn(x0_gen.shape, generator=gen, device=self.device))
            x_near = perturbed(x_real, cfg.disc.r1_alpha, gen)
            features = self._features(torch.cat([x_real, x_fake, x_near]), td.repeat(3), text.repeat(3, 1, 1),
                                      mask.repeat(3, 1))  # one teacher pass for all three
            d_real, d_fake, d_near = self.head(features).chunk(3)
            d_loss = discriminator_loss(d_real, d_fake).mean()
            r1 = approx_r1(d_real, d_near, cfg.disc.r1_gamma).mean()
            loss = loss + cfg.losses.disc * (d_loss + r1)
            values.update(disc=float(d_loss.detach()), r1=float(r1.detach()),
                          d_real=float(torch.sigmoid(d_real.detach()).mean()),
                          d_fake=float(torch.sigmoid(d_fake.detach()).mean()))
        loss.backward()
        values["fake_grad_norm"] = float(grad_norm_and_clip(self.fake_params, cfg.optim.grad_clip))
        if self.head is not None:
            grad_norm_and_clip(list(self.head_plain.parameters()), cfg.optim.grad_clip)
        names = list(values)
        summed = all_reduce([values[n] for n in names] + [float(not math.isfinite(float(loss.detach())))], self.d,
                            self.device)
        finite = summed[-1] == 0 and all(math.isfinite(v) for v in summed[:-1])
        if finite:
            self.fake_optim.step()
            if self.disc_optim is not None:
                self.disc_optim.step()
            self._update_fake_ema()
        self.fake_optim.zero_grad(set_to_none=True)
        if self.disc_optim is not None:
            self.disc_optim.zero_grad(set_to_none=True)
        for name, value in zip(names, summed):
            terms[name] += value / self.d.world / cfg.fake.updates
        return finite

    @torch.no_grad()
    def _update_fake_ema(self) -> None:
        """e ← (1 − μ)·e + μ·fake, on each rank's own shards (the two models are laid out alike)."""
        if self.fake_ema is None:
            return
        ema, live = list(self.fake_ema.parameters()), list(self.fake.parameters())
        targets = [local(e) for e in ema]
        torch._foreach_lerp_(targets, [local(p).to(e.dtype) for p, e in zip(live, targets)], self.cfg.fake.ema)

    def student_step(self, batch: Batch, step: int, terms: dict) -> dict:
        """The student's update: DMD (+ the decoupled CFG term) + λ_g·GAN through the frozen teacher."""
        cfg, w = self.cfg, self.cfg.losses
        x0_real, text, mask, tokens = self._inputs(batch)
        gen, b = self._generator(step, cfg.fake.updates), x0_real.shape[0]
        lr = self.set_lr(step)
        x0_gen = self.student_x0(x0_real, text, mask, tokens, gen, grad=True)
        t = self._timesteps(b, tokens, gen)
        x_t = noised(x0_gen, t, torch.randn(x0_gen.shape, generator=gen, device=self.device))  # graph → GAN
        x_score = x_t.detach()
        with torch.no_grad(), self._context():
            score = self.fake_ema if self.fake_ema is not None else self.fake
            v_fake = self._velocity(score, x_score, t, text, mask)
        gan, guided = self.head is not None, w.ca > 0
        x_in, t_in, text_in, mask_in = x_t if gan else x_score, t, text, mask
        if guided:  # the conditional and unconditional teacher in one batch, conditional first
            x_in, t_in = torch.cat([x_in, x_in]), torch.cat([t, t])
            text_in, mask_in = torch.cat([text, torch.zeros_like(text)]), torch.cat([mask, torch.zeros_like(mask)])
        with torch.set_grad_enabled(gan), self._context():
            v_teacher = self._velocity(self.teacher, x_in, t_in, text_in, mask_in)
        self._flops += self._flops_per * (2 if guided else 1) * (2 if gan else 1) + self._flops_per
        if guided:
            v_cond, v_uncond = v_teacher.detach().chunk(2)
            dm, ca = decoupled_dmd(x0_gen, x_score, t, v_fake, v_cond, v_uncond, cfg.guidance)
        else:
            dm, ca = dmd_loss(x0_gen, x_score, t, v_fake, v_teacher.detach()), torch.zeros(b, device=self.device)
        loss = w.dm * dm.mean() + w.ca * ca.mean()
        g = torch.zeros((), device=self.device)
        if gan:  # the head's weights detached: the student's loss must not train the discriminator
            params = {name: p.detach() for name, p in self.head_plain.named_parameters()}
            logits = torch.func.functional_call(self.head_plain, params, (self.tap.take()[:b],))
            g = generator_gan_loss(logits).mean()
            loss = loss + w.gan * g
        loss.backward()
        release(self.teacher)
        norm = grad_norm_and_clip(self.params, cfg.optim.grad_clip)
        out = self.apply_update(loss, norm, b, b * tokens, step, lr, batch.bucket,
                                {"flops": self._flops, "dm": float(dm.detach().mean()),
                                 "ca": float(ca.detach().mean()), "gan": float(g.detach())})
        terms.update({name: out.pop(name) for name in ("dm", "ca", "gan")})
        return {**out, "terms": dict(terms)}

    # -- checkpoints --------------------------------------------------------------------------------------------
    def save_more(self, step_dir: Path) -> None:
        where = step_dir / STATE_DIR
        fake = full_weights(self.fake)
        fake_ema = full_weights(self.fake_ema) if self.fake_ema is not None else None
        if self.d.main:
            save_weights(where / FAKE, fake, self.score_spec)
            if fake_ema is not None:
                save_weights(where / FAKE_EMA, fake_ema, self.score_spec)
            if self.head is not None:
                write_safetensors(where / DISC, self.head_plain.state_dict(), {})
        self.d.barrier()
        ckpt.save_optimizer(where / FAKE_OPTIM, self.fake, self.fake_optim, self.d)
        if self.disc_optim is not None:
            ckpt.save_optimizer(where / DISC_OPTIM, self.head, self.disc_optim, self.d)


def distill(cfg: DistillConfig, data: str | Path, out: str | Path, resume: bool = False) -> dict:
    """Set up the process group (if torchrun started us), distill, tear down."""
    from training.parallel import close_distributed

    try:
        return Distiller(cfg, data, out, resume=resume).fit()
    finally:
        close_distributed()
