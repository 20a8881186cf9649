"""`lensforge generate "PROMPT" (--run RUN | --checkpoint PATH) --out DIR [--steps 20] [--cfg 5.0]
[--size WxH | --aspect 16:9 [--base-size 1440]] [--seed 0] [--n 4] [--prompts FILE] [--dtype bf16] [--offload]
[--lora FILE[:SCALE] ...] [--rewrite --rewrite-base-url URL ...]`

PATH: a step directory or weights file of a lensforge run, a Lens release root (`model_index.json`, `transformer/`,
`vae/`, `text_encoder/`, `tokenizer/`), its `transformer/` folder, or a single-file DiT (the last two with
`--codec` and `--text-encoder`, which name nothing themselves).

Writes OUT/PPP_KK.png (prompt PPP, sample KK, seed = --seed + KK), OUT/PPP_grid.png when --n > 1, and
OUT/generate.json with every setting, the checkpoint and each image's prompt and seed.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from common.atomic import write_json

NAME = "generate"
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16"}
HELP = "sample images from a checkpoint (a run's latest step, EMA preferred, or one step directory)"
DEFAULT_STEPS, DEFAULT_CFG = 20, 5.0  # unless the checkpoint says its own (a distilled student: 4 steps, CFG 1)
# The CPU's rate for the slow-sampling warning: the developers' 2-core VM ran BENCHMARKS.md's `small` train step
# (6 · 43.4 M parameters · 288 tokens · batch 4 FLOPs) in 1.19 s, about 250 GFLOP/s.
CPU_FLOPS = 250e9
SLOW_STEP_S = 10.0  # warn above this many seconds a sampling step

# Lens's "reasoner": an LLM expands a short prompt into the dense caption style the model was trained on.
REWRITE_PROMPT = (
    "Rewrite the user's image request as one dense, literal description of the image, in the style of a "
    "detailed caption: every object with its colour, shape, size and position, the background, the lighting "
    "and the style. Do not add objects the request does not imply. Reply with the description only."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", help="the prompt (or --prompts FILE)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run directory: its latest checkpoints/step_*, EMA weights preferred")
    source.add_argument("--checkpoint", metavar="PATH", help="a step directory or .safetensors file, a Lens release "
                        "root or its transformer/ folder, a single-file DiT")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    parser.add_argument("--steps", type=int, default=None, help=f"sampling steps (default: the checkpoint's own, "
                        f"e.g. a distilled student's 4; else {DEFAULT_STEPS})")
    parser.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale, 1 = off (default: "
                        f"the checkpoint's own, e.g. 1 for a distilled student; else {DEFAULT_CFG})")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--size", help="WIDTHxHEIGHT, multiples of 16, up to 2080x1040 (default: the model's base)")
    size.add_argument("--aspect", help="1:2, 9:16, 2:3, 3:4, 1:1, 4:3, 3:2, 16:9 or 2:1 (Lens's tables at base "
                      "1024 and 1440, up to 2080x1040)")
    parser.add_argument("--base-size", type=int, help="base side for --aspect and the default size (default: the "
                        "model's; Lens: 1024, or 1440)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=4, help="images per prompt")
    parser.add_argument("--prompts", metavar="FILE", help="text file, one prompt a line (blank lines skipped)")
    parser.add_argument("--negative", default="", help="negative prompt (default: empty = no tokens)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast over fp32 weights (default on CUDA)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="load the weights in this dtype (default: as "
                        "stored); bfloat16 runs a bf16 release as the Lens pipeline does, no autocast")
    parser.add_argument("--offload", action="store_true", help="keep the text encoder on the CPU except while it "
                        "encodes (GPU memory: the larger of text encoder and denoiser + VAE, not their sum)")
    parser.add_argument("--text-device", help="where the text encoder runs (default: --device); cpu keeps a bf16 "
                        "GPT-OSS-20B (42 GB) off a smaller GPU")
    parser.add_argument("--codec", help="latent codec spec, e.g. flux2:LENS_DIR/vae (default: the checkpoint's)")
    parser.add_argument("--text-encoder", help="text encoder spec, e.g. gpt-oss:LENS_DIR (default: the checkpoint's)")
    parser.add_argument("--date", help="YYYY-MM-DD for the GPT-OSS chat template's date line (default: the one the "
                        "checkpoint's features were made with, else today's, as the Lens pipeline)")
    parser.add_argument("--noise", choices=["tokens", "latent"], default="tokens", help="noise layout per seed: "
                        "tokens = the Lens pipeline's (the same seed gives its image), latent = (C, H, W)")
    parser.add_argument("--no-ema", action="store_true", help="load model.safetensors even where EMA exists")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]", help="merge a LoRA into "
                        "the weights (repeatable; SCALE default 1): a lensforge adapter, or diffusers' / ComfyUI's "
                        "/ PEFT's LoRA safetensors")
    rewrite = parser.add_argument_group("prompt rewriting (Lens's reasoner), off by default")
    rewrite.add_argument("--rewrite", action="store_true", help="expand each prompt with an LLM first")
    rewrite.add_argument("--rewrite-base-url", default=os.environ.get("OPENAI_BASE_URL"),
                         help="OpenAI-compatible endpoint (default: $OPENAI_BASE_URL)")
    rewrite.add_argument("--rewrite-model", default="gpt-4.1", help="model name at that endpoint")


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = [args.prompt] if args.prompt is not None else []
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file not found: {path}")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError("give a PROMPT or --prompts FILE")
    return prompts


def rewrite_prompts(prompts: list[str], base_url: str | None, model: str) -> list[str]:
    """Each prompt expanded by a chat model at an OpenAI-compatible endpoint, through the captioning client
    (its retries, rate control and key handling: OPENAI_API_KEY, or none needed for a loopback endpoint)."""
    if not base_url:
        raise ValueError("--rewrite needs --rewrite-base-url (or OPENAI_BASE_URL)")
    import asyncio

    from captioning.client import Sender, make_client, resolve_api_key
    from captioning.config import CaptionConfig

    cfg = CaptionConfig(base_url=base_url, model=model)

    async def run() -> list[str]:
        api_key = resolve_api_key(cfg)
        client = make_client(cfg, api_key)
        sender, out = Sender(client, cfg, api_key), []
        try:
            for i, prompt in enumerate(prompts):
                body = {"model": model, "temperature": 0.0, "messages": [
                    {"role": "system", "content": REWRITE_PROMPT}, {"role": "user", "content": prompt}]}
                answer = await sender.send(body, f"prompt-{i}")
                if answer.body is None:
                    raise ValueError(f"prompt rewriting failed: {answer.error}")
                text = answer.body["choices"][0]["message"].get("content") or ""
                out.append(text.strip() or prompt)
        finally:
            await client.close()
        return out

    return asyncio.run(run())


def check_args(args: argparse.Namespace) -> None:
    for name, low in ("steps", 1), ("n", 1), ("batch_size", 1):
        if getattr(args, name) is not None and getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be ≥ {low}")
    # nan or inf: every latent NaN, a black image
    if args.cfg is not None and (not math.isfinite(args.cfg) or args.cfg < 0):
        raise ValueError(f"--cfg {args.cfg}: must be a finite number ≥ 0 (1 = no guidance)")


def parse_loras(texts: list[str]) -> list[tuple[Path, float]]:
    """--lora FILE[:SCALE] arguments → (file, scale), each scale a finite number (NaN would blacken the image)."""
    from inference.lora import parse_lora_arg

    loras = [parse_lora_arg(text) for text in texts]
    for (file, scale), text in zip(loras, texts):
        if not math.isfinite(scale):
            raise ValueError(f"--lora {text}: the scale of {file} must be a finite number")
    return loras


def warn_if_slow(pipe, width: int, height: int, cfg: float, batch: int, steps: int) -> None:
    """One line on stderr when sampling on the CPU will take long: the FLOPs of a step (`Pipeline.step_flops` ×
    `batch` images) at CPU_FLOPS, above SLOW_STEP_S; `steps`: sampling steps in all. A lower bound (attention left
    out), so on a machine as slow as the developers' the warning is never a false one."""
    if pipe.device.type != "cpu":
        return
    per_step = pipe.step_flops(width, height, cfg) * batch / CPU_FLOPS
    if per_step > SLOW_STEP_S:
        print(f"generate: warning: {width}x{height} on the CPU takes about {per_step:,.0f} s a sampling step, "
              f"{per_step * steps / 60:,.0f} min for all {steps} (estimated at {CPU_FLOPS / 1e9:.0f} GFLOP/s): "
              "a GPU (--device cuda) or a smaller --size is far faster", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    import torch

    from common.progress import progress_bar
    from inference.checkpoint import describe_denoiser, latest_step_dir, sampling_settings, stored_dtype
    from inference.generate import Pipeline, make_grid, parse_size, size_for_aspect, validate_size

    check_args(args)
    prompts = read_prompts(args)
    loras = parse_loras(args.lora)
    where = latest_step_dir(args.run) if args.run else args.checkpoint  # --run: its latest step, or an error
    source = describe_denoiser(where, prefer_ema=not args.no_ema).with_adapters(loras)
    args.steps, args.cfg = sampling_settings(source.spec, args.steps, args.cfg, DEFAULT_STEPS, DEFAULT_CFG)
    base = args.base_size or source.spec.model.base_size
    if args.size:
        width, height = parse_size(args.size)
    elif args.aspect:
        width, height = size_for_aspect(args.aspect, base)
    else:
        width, height = validate_size(base, base)
    rewritten = rewrite_prompts(prompts, args.rewrite_base_url, args.rewrite_model) if args.rewrite else prompts
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    fp32 = (dtype or stored_dtype(source)) == torch.float32  # bf16 weights compute in bf16, as the Lens pipeline
    autocast = torch.bfloat16 if fp32 and (args.bf16 or device.startswith("cuda")) else None
    pipe = Pipeline.from_source(source, device=device, dtype=dtype, autocast=autocast, codec=args.codec,
                                text_encoder=args.text_encoder, date=args.date, offload=args.offload,
                                noise_layout=args.noise, text_device=args.text_device)
    jobs = [(i, k) for i in range(len(prompts)) for k in range(args.n)]
    batches = math.ceil(len(jobs) / args.batch_size)
    warn_if_slow(pipe, width, height, args.cfg, min(args.batch_size, len(jobs)), args.steps * batches)
    start = time.perf_counter()
    with progress_bar(total=args.steps * batches, desc="generate", unit="step") as bar:
        images = pipe.generate([rewritten[i] for i, _ in jobs], width, height, steps=args.steps, cfg=args.cfg,
                               seeds=[args.seed + k for _, k in jobs], negative=args.negative,
                               batch_size=args.batch_size, on_step=bar.update)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for (i, k), image in zip(jobs, images):
        image.save(out / f"{i:03d}_{k:02d}.png")
        records.append({"file": f"{i:03d}_{k:02d}.png", "prompt": prompts[i], "model_prompt": rewritten[i],
                        "seed": args.seed + k})
    if args.n > 1:
        for i in range(len(prompts)):
            make_grid(images[i * args.n:(i + 1) * args.n]).save(out / f"{i:03d}_grid.png")
    settings = {
        "checkpoint": [str(f) for f in source.files], "kind": source.kind,
        "lora": [{"file": str(f), "scale": w} for f, w in source.adapters], "spec": source.spec.model_dump(),
        "codec": pipe.codec.spec, "text_encoder": pipe.text_encoder.identity(), "width": width, "height": height,
        "steps": args.steps, "cfg": args.cfg, "seed": args.seed, "n": args.n, "negative": args.negative,
        "rewrite": {"base_url": args.rewrite_base_url, "model": args.rewrite_model} if args.rewrite else None,
        "device": device, "dtype": str(pipe.dtype), "autocast": str(autocast) if autocast else None,
        "offload": args.offload, "text_device": str(pipe.text_device), "noise": args.noise,
        "seconds": round(time.perf_counter() - start, 2),
        "images": records,
    }
    write_json(out / "generate.json", settings, indent=2)
    print(f"{len(images)} images of {width}x{height} in {settings['seconds']} s → {out}")
    return 0
