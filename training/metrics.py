"""Seeing training learn: `RUN/metrics.jsonl`, the progress bar, FLOPs/MFU, validation loss and the sample grid.

    RUN/metrics.jsonl     one JSON object a line, `kind` = train | val | sample | skip | checkpoint | resume | stop
    RUN/samples/step_XXXXXXXX.png   the fixed prompts sampled from the EMA weights (inference.generate.Pipeline)
    RUN/tensorboard/      the same scalars, only when the `tensorboard` package is importable

`train` records average over the last `log_every` steps: loss (mean over ranks), grad_norm (global), lr,
samples_per_s and tokens_per_s (image tokens; all ranks together), data_wait (fraction of step time spent waiting
for the batch), step_s, tflops and mfu (per device: FLOPs from the model config and the batches' actual token
counts, against `peak_tflops`), skipped (non-finite steps), mem_gb (peak: CUDA allocated, else process RSS).
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch

from common.progress import progress_bar
from inference.config import ModelConfig
from inference.flow import RectifiedFlow, pad_text
from inference.text import TextEncoder


def forward_flops(cfg: ModelConfig, image_tokens: int, text_tokens: int) -> float:
    """Matmul FLOPs of one sample's forward pass (2 per multiply-add), attention included.

    Per block and token: QKV 3D², output D², SwiGLU 3·D·M; attention 2·2·Tq·Tk·D. The last block runs the text
    stream only up to its keys and values (inference/mmdit.py)."""
    d, m, n, length = cfg.hidden, cfg.mlp, image_tokens, text_tokens
    t = n + length
    per_token = 2 * (4 * d * d + 3 * d * m)
    block = t * per_token + 4 * t * t * d + 2 * 2 * d * 6 * d
    last = n * per_token + length * 2 * 3 * d * d + 4 * n * t * d + 2 * 2 * d * 6 * d
    embed = 2 * n * cfg.token_channels * d * 2 + 2 * length * cfg.text_layers * cfg.text_dim * d
    return float((cfg.depth - 1) * block + last + embed)


def train_flops(cfg: ModelConfig, batch: int, image_tokens: int, text_tokens: int, frozen: bool = False) -> float:
    """Forward + backward (2× forward), without activation-checkpointing recompute (MFU, not HFU). `frozen`: a
    LoRA run, whose backward computes input gradients but no weight gradients of the base (1× forward; the
    adapters' own FLOPs, r/D of the base's, are left out)."""
    return (2.0 if frozen else 3.0) * batch * forward_flops(cfg, image_tokens, text_tokens)


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS, KiB on Linux


class MetricsLog:
    """Rank 0 writes; every rank may call (the others do nothing)."""

    def __init__(self, run: Path, main: bool, total: int, start: int, progress: bool):
        self.main, self.path = main, Path(run) / "metrics.jsonl"
        self.bar = progress_bar(total=total, initial=start, disable=not (main and progress), unit="step",
                                dynamic_ncols=True)
        self.tb = None
        if main:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package

                self.tb = SummaryWriter(str(Path(run) / "tensorboard"))
            except ImportError:
                pass

    def write(self, kind: str, step: int, **values) -> None:
        if not self.main:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)
        if kind in ("skip", "stop", "val"):
            self.bar.write(f"step {step} {kind}: " + ", ".join(f"{k}={v}" for k, v in values.items()))

    def advance(self, loss: float | None, samples_per_s: float | None) -> None:
        self.bar.update(1)
        if loss is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", sps=f"{samples_per_s:.1f}", refresh=False)

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()


@torch.no_grad()
def validation_loss(model, flow: RectifiedFlow, batches, timesteps: list[float], device, context, seed: int) -> dict:
    """Mean velocity loss on the held-out batches at each fixed t, with noise fixed per batch and t."""
    model.eval()
    sums = {t: 0.0 for t in timesteps}
    count = 0
    for i, batch in enumerate(batches):
        x0 = batch.latents.to(device).float()
        text, mask = batch.text.to(device).float(), batch.mask.to(device)
        for j, t in enumerate(timesteps):
            g = torch.Generator(device="cpu").manual_seed(seed * 1000003 + i * 101 + j)
            noise = torch.randn(x0.shape, generator=g).to(device)
            with context:
                loss = flow.loss(model, x0, text, mask, t=torch.full((x0.shape[0],), t, device=device), noise=noise)
            sums[t] += float(loss.sum())
        count += x0.shape[0]
    model.train()
    per_t = {f"{t:g}": s / max(count, 1) for t, s in sums.items()}
    return {"val_loss": sum(per_t.values()) / len(per_t), "val_loss_t": per_t, "val_samples": count}


class CachedText(TextEncoder):
    """A text encoder that only knows a fixed set of prompts, encoded once: the sample grid needs the features of
    a few prompts, not a resident copy of the encoder (GPT-OSS-20B) beside the model being trained."""

    def __init__(self, encoder: TextEncoder, prompts: list[str]):
        self.spec, self.dim, self.layers = encoder.spec, encoder.dim, encoder.layers
        self.table = {}
        for p in dict.fromkeys(prompts):
            f, m = encoder.encode([p])
            self.table[p] = (f, m)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [p for p in prompts if p not in self.table]
        if missing:
            raise KeyError(f"prompt not cached: {missing[0]!r}")
        return pad_text([self.table[p][0] for p in prompts], [self.table[p][1] for p in prompts])


class SampleGrid:
    """The fixed prompts × one seed each, sampled from given weights and saved as RUN/samples/step_XXXXXXXX.png."""

    def __init__(self, run: Path, spec, prompts: list[str], steps: int, cfg: float, seed: int, size: int | None,
                 device: torch.device):
        from inference.codecs import load_codec
        from inference.text import load_text_encoder

        self.dir, self.spec, self.prompts = Path(run) / "samples", spec, prompts
        self.steps, self.cfg, self.seed, self.device = steps, cfg, seed, device
        self.size = size or spec.model.base_size
        encoder = load_text_encoder(spec.text_encoder, device=device, date=spec.text_date)
        self.text = CachedText(encoder, prompts + [""])
        del encoder
        self.codec = load_codec(spec.codec, device=device)

    @torch.no_grad()
    def render(self, step: int, weights: dict[str, torch.Tensor]) -> Path:
        from inference.generate import Pipeline, make_grid
        from inference.mmdit import MMDiT

        with torch.device("meta"):
            model = MMDiT(self.spec.model)
        model.load_state_dict(weights, strict=True, assign=True)
        model = model.to(self.device).eval()
        autocast = torch.bfloat16 if self.device.type == "cuda" else None
        pipe = Pipeline(model, self.codec, self.text, device=self.device, autocast=autocast)
        images = pipe.generate(self.prompts, self.size, self.size, steps=self.steps, cfg=self.cfg,
                               seeds=[self.seed + i for i in range(len(self.prompts))], batch_size=8)
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"step_{step:08d}.png"
        make_grid(images).save(path)
        (self.dir / "prompts.json").write_text(json.dumps(self.prompts, indent=1) + "\n")
        return path
