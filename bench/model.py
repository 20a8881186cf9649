"""The denoiser against diffusers' SD3 MMDiT on this machine's CPU, ratios from one run.

    .venv/bin/python -m bench.model              # ~2 minutes on 2 cores
    .venv/bin/python -m bench.model --repeats 5 --batch 8

1. Train step (forward + backward + AdamW) of the `small` preset versus `diffusers.SD3Transformer2DModel` at the
   same width, depth, heads, token counts (256 image + 32 text) and MLP FLOPs (SD3's GELU 4×D ≡ SwiGLU 1024).
2. Achieved FLOP/s of each step (FLOPs counted by torch's FlopCounterMode, attention included; ours checked against
   the analytic count of training/metrics.py) as a fraction of this machine's dense fp32 matmul FLOP/s, measured
   in the same process with the same threads: the best of square matmuls of 512–2048 run between the timed steps,
   so that a quiet moment counts for the peak as it does for the steps (a share of a peak cannot pass 100 %).
3. 20-step sampling at 256² (a /8 codec's 32-channel latent, patch 2 → 256 tokens, CFG 5 with an empty negative
   prompt) through `inference.flow`, versus the same SD3 transformer in a plain Euler loop with CFG.
Timings interleave the two models; the ratio is of best-of-N times (on a shared CPU other jobs only ever add
time), the ratio of medians beside it. Goal: ours ≤ 1.0× SD3's time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from inference.config import get_preset
from inference.flow import RectifiedFlow, initial_noise
from inference.mmdit import MMDiT

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench.report, also for `python bench/model.py`
from bench.report import emit, row  # noqa: E402

aten = torch.ops.aten
TEXT_TOKENS = 32


def _sdpa_fwd(q, k, *_args, **_kw):  # shapes (B, H, T, Dh); QKᵀ and PV
    return 4 * q[0] * q[1] * q[2] * k[2] * q[3]


def _sdpa_bwd(_grad, q, k, *_args, **_kw):
    return 2 * _sdpa_fwd(q, k)


# CPU flash attention has no formula in torch's counter; the masked (math) path decomposes into counted bmm.
SDPA_FLOPS = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_fwd,
              aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_bwd}


def matmul_flops_per_s(sizes=(512, 1024, 2048), repeats: int = 2) -> float:
    """Dense fp32 matmul FLOP/s: the best over square sizes and repeats (each size warmed up first)."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        best = max(best, 2 * n**3 / min(_time(lambda: a @ b) for _ in range(repeats)))
    return best


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def sd3_like(cfg, sample_size: int):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=sample_size, patch_size=cfg.patch, in_channels=cfg.in_channels, out_channels=cfg.in_channels,
        num_layers=cfg.depth, attention_head_dim=cfg.head_dim, num_attention_heads=cfg.heads,
        joint_attention_dim=cfg.text_layers * cfg.text_dim, caption_projection_dim=cfg.hidden,
        pooled_projection_dim=cfg.hidden, pos_embed_max_size=sample_size // cfg.patch, qk_norm="rms_norm",
    )


def train_steps(cfg, batch: int, side: int):
    """Two closures, one AdamW step each: ours and SD3's, on the same shapes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, side, side, generator=g)
    t = torch.rand(batch, generator=g)
    text = torch.randn(batch, TEXT_TOKENS, cfg.text_layers * cfg.text_dim, generator=g)
    mask = torch.ones(batch, TEXT_TOKENS, dtype=torch.bool)
    ours, theirs = MMDiT(cfg), sd3_like(cfg, side)
    pooled = torch.randn(batch, cfg.hidden, generator=g)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-4)

    def step_ours():
        ours(x, t, text, mask).square().mean().backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_theirs():
        out = theirs(x, text, pooled, t * 1000, return_dict=False)[0]
        out.square().mean().backward()
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)

    return step_ours, step_theirs


def count_flops(fn) -> int:
    with FlopCounterMode(display=False, custom_mapping=SDPA_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


def sampling(cfg, steps: int, side: int):
    """20-step CFG sampling closures: ours through RectifiedFlow.sample, SD3 in a plain Euler loop."""
    ours, theirs = MMDiT(cfg).eval(), sd3_like(cfg, side).eval()
    g = torch.Generator().manual_seed(0)
    for model in ours, theirs:  # not adaLN-zero outputs: real activations everywhere
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    noise = initial_noise((1, cfg.in_channels, side, side), [0])
    text = torch.randn(1, TEXT_TOKENS, cfg.text_layers * cfg.text_dim, generator=g)
    mask = torch.ones(1, TEXT_TOKENS, dtype=torch.bool)
    neg = (text[:, :0], mask[:, :0])  # Lens: the empty negative prompt has no tokens
    flow = RectifiedFlow()
    pooled = torch.zeros(2, cfg.hidden)
    text2 = torch.cat([text, torch.zeros_like(text)])  # SD3 has no mask: zero features for the negative

    def run_ours():
        flow.sample(ours, noise, text, mask, steps=steps, cfg=5.0, neg=neg)

    @torch.no_grad()
    def run_theirs():
        x = noise
        sigmas = torch.linspace(1, 0, steps + 1).tolist()
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            t = torch.full((2,), s * 1000)
            v_c, v_u = theirs(torch.cat([x, x]), text2, pooled, t, return_dict=False)[0].chunk(2)
            x = x + (s_next - s) * (v_u + 5.0 * (v_c - v_u))

    return run_ours, run_theirs


def compare(a, b, repeats: int, peaks: list[float] | None = None) -> tuple[list[float], list[float]]:
    """Seconds of a and b over `repeats` interleaved runs, after one warm-up each; with `peaks`, the matmul
    FLOP/s is measured between them too."""
    a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        if peaks is not None:
            peaks.append(matmul_flops_per_s())
        ta.append(_time(a))
        tb.append(_time(b))
    if peaks is not None:
        peaks.append(matmul_flops_per_s())
    return ta, tb


def _row(label: str, ours: list[float], theirs: list[float]) -> str:
    """Best-of-N seconds and their ratio (other jobs only ever add time), then the ratio of medians."""
    best = min(ours) / min(theirs)
    median = statistics.median(ours) / statistics.median(theirs)
    return f"{label:<30}{min(ours):>10.3f}{min(theirs):>18.3f}{best:>8.2f}×{median:>9.2f}×"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    from training.metrics import train_flops

    torch.manual_seed(0)
    cfg = get_preset("small")  # pixel codec /4 at 64² → 16×16 = 256 image tokens, patch 1
    ours, theirs = train_steps(cfg, args.batch, side=16)
    flops_ours, flops_theirs = count_flops(ours), count_flops(theirs)
    analytic = train_flops(cfg, args.batch, 256, TEXT_TOKENS)
    peaks: list[float] = []
    t_ours, t_theirs = compare(ours, theirs, args.repeats, peaks)
    peak = max(peaks)  # the machine's dense fp32 rate, same threads, measured between the steps
    lens_like = cfg.model_copy(update={"in_channels": 32, "patch": 2})  # 256² through a /8 codec → 32², patch 2
    s_ours, s_theirs = compare(*sampling(lens_like, args.steps, side=32), repeats=max(1, args.repeats - 1))

    print(f"threads {torch.get_num_threads()}, dense fp32 matmul {peak / 1e9:.1f} GFLOP/s; "
          f"preset small, batch {args.batch}, 256 image + {TEXT_TOKENS} text tokens, {args.repeats} repeats")
    print(f"{'':<30}{'ours':>10}{'SD3 (diffusers)':>18}{'ratio':>9}{'median':>10}")
    print(_row("train step, s (best)", t_ours, t_theirs))
    print(f"{'train step, GFLOP':<30}{flops_ours / 1e9:>10.1f}{flops_theirs / 1e9:>18.1f}"
          f"{flops_ours / flops_theirs:>8.2f}×   (ours, analytic: {analytic / 1e9:.1f})")
    frac_ours, frac_theirs = flops_ours / min(t_ours) / peak, flops_theirs / min(t_theirs) / peak
    print(f"{'achieved / matmul FLOP/s':<30}{frac_ours:>10.1%}{frac_theirs:>18.1%}   (peak {peak / 1e9:.1f} "
          f"GFLOP/s, best of {len(peaks)} rounds between the steps; spread {min(peaks) / 1e9:.1f}–"
          f"{max(peaks) / 1e9:.1f})")
    print(_row(f"{args.steps}-step CFG sampling 256², s", s_ours, s_theirs))
    emit([row("model", f"`small` train step (fwd + bwd + AdamW), 256 + {TEXT_TOKENS} tokens, batch {args.batch}, best "
              f"of {args.repeats}", min(t_ours), "s", peer=min(t_theirs), peer_name="diffusers SD3Transformer2DModel, "
              "same shape", goal="<= 1.0"),
          row("model", "achieved FLOP/s of that step, % of measured matmul FLOP/s", 100 * frac_ours, "%",
              peer=100 * frac_theirs, peer_name="SD3"),
          row("model", f"{args.steps}-step CFG sampling at 256²", min(s_ours), "s", peer=min(s_theirs),
              peer_name="SD3 in a plain Euler loop with CFG", goal="<= 1.0")])


if __name__ == "__main__":
    main()
