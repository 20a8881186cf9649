"""Typed configuration of `lensforge distill` (the `distill:` section): the trainer's fields plus the recipe.

    distill:
      teacher: runs/demo                      # anything `load_denoiser` reads; the student and fake score start here
      student_steps: 4                        # the student's schedule: Lens's shifted σ at that many steps
      losses: {dm: 1.0, ca: 1.0, gan: 1.0e-3, disc: 0.1}   # 0 switches a term off ("DMD alone": ca 0, gan 0)
      guidance: 5.0                           # the CFG-augmentation term's guidance w
      fake: {lr: 5.0e-7, updates: 4, ema: 0.03}
      disc: {lr: 1.0e-4, r1_gamma: 1.0, r1_alpha: 0.1}
      optim: {lr: 5.0e-7}                     # the student's (the trainer's optim section)
      max_steps: 1000

Every `train:` field means what it means there (data, optim for the student, ema of the student, parallel,
sample, checkpoints); `init_from` is the teacher. The defaults are Lens-Turbo's recipe for the 3.8 B model
(configs/lens-turbo.yaml spells it out); docs/distill/ has the tiny-model settings that work on a CPU. Imports no
torch, like train_config.py.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from training.train_config import EMAConfig, OptimConfig, SampleConfig, TrainConfig, _Strict


class LossWeights(_Strict):
    """Each term's weight; 0 switches it off (and skips the work only it needs)."""

    dm: float = Field(1.0, ge=0, description="distribution matching against the conditional teacher (DMD2)")
    ca: float = Field(1.0, ge=0, description="the decoupled CFG-augmentation term (guidance baked in); 0 = plain "
                      "DMD against the conditional teacher, no unconditional teacher pass")
    gan: float = Field(1e-3, ge=0, description="λ_g: the student's non-saturating GAN loss; 0 = no adversarial "
                       "branch at all (no discriminator)")
    disc: float = Field(0.1, ge=0, description="λ_d: the discriminator's loss (with its R1 penalty)")


class FakeScoreConfig(_Strict):
    lr: float = Field(5e-7, ge=0, description="AdamW LR of the fake score (Lens-Turbo: the student's, 5e-7)")
    updates: int = Field(4, ge=1, description="fake-score / discriminator updates per student update (TTUR)")
    ema: float = Field(0.03, ge=0, le=1, description="μ: the DMD term reads an EMA of the fake score, "
                       "e ← (1 − μ)·e + μ·fake after every fake update; 0 = the live fake score")
    t_min: float = Field(0.02, ge=0, lt=1, description="DMD / fake-score timesteps: shifted logit-normal t, "
                         "clamped to [t_min, t_max] (DMD2's 0.02–0.98)")
    t_max: float = Field(0.98, gt=0, le=1)


class DiscConfig(_Strict):
    lr: float = Field(1e-4, ge=0, description="AdamW LR of the discriminator head (Lens-Turbo: 1e-4)")
    betas: tuple[float, float] = (0.0, 0.99)
    block: int | None = Field(None, ge=0, description="the frozen teacher's block whose image tokens the head "
                              "reads; None = the middle block")
    r1_gamma: float = Field(1.0, ge=0, description="γ of the approximate R1 penalty (0 = off)")
    r1_alpha: float = Field(0.1, gt=0, description="α: the perturbation of real inputs in the approximate R1")


class DistillConfig(TrainConfig):
    teacher: str = Field(..., description="the teacher: a Lens release, transformer/ folder, single file or run "
                         "(anything `load_denoiser` reads); frozen; the student and the fake score start from it")
    student_steps: int = Field(4, ge=1, le=64, description="the student's sampling steps (Lens-Turbo: 4); "
                               "its checkpoints record them, and CFG 1, as generate's defaults")
    guidance: float = Field(5.0, ge=1, description="w of the CFG-augmentation term (Lens-Turbo: 5)")
    backward_simulation: bool = Field(True, description="the student's inputs at step k come from running it "
                                      "from noise for k steps (DMD2), as at inference; False: noised real latents")
    losses: LossWeights = LossWeights()
    fake: FakeScoreConfig = FakeScoreConfig()
    disc: DiscConfig = DiscConfig()

    optim: OptimConfig = OptimConfig(lr=5e-7)  # the student's (Lens-Turbo: 5e-7)
    ema: EMAConfig = EMAConfig(decay=0.99)  # ≤ 1 K steps: a 0.9999 average would hold the teacher
    sample: SampleConfig = SampleConfig(cfg=1.0)  # grids as the student is used (steps: student_steps)

    @model_validator(mode="before")
    @classmethod
    def _teacher_is_init(cls, values: Any) -> Any:
        """The student starts from the teacher: `init_from` is the teacher unless both are given and differ."""
        if isinstance(values, dict) and values.get("teacher"):
            given = values.get("init_from")
            if given and given != values["teacher"]:
                raise ValueError(f"distill.init_from {given!r} differs from distill.teacher {values['teacher']!r}: "
                                 "the student starts from the teacher (set teacher only)")
            values = {**values, "init_from": values["teacher"]}
        return values

    @model_validator(mode="after")
    def _recipe(self) -> "DistillConfig":
        if self.fake.t_min >= self.fake.t_max:
            raise ValueError(f"distill.fake.t_min {self.fake.t_min} must be below t_max {self.fake.t_max}")
        if "steps" not in self.sample.model_fields_set:
            self.sample = self.sample.model_copy(update={"steps": self.student_steps})
        if not (self.losses.dm or self.losses.ca or self.losses.gan):
            raise ValueError("distill.losses: every student term is 0 (dm, ca, gan): nothing would train")
        return self

    def needs_disc(self) -> bool:
        return self.losses.gan > 0
