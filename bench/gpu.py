"""GPU figures of the released Lens architecture at full size, random weights, one process (bench/gpu.sh runs it).

    .venv/bin/python -m bench.gpu                          # on a CUDA machine: lens-3.8b, FLUX.2 VAE, GPT-OSS-20B
    .venv/bin/python -m bench.gpu --steps 4 --cfg 1               # a distilled student (Lens-Turbo's way)
    .venv/bin/python -m bench.gpu --train lora             # a LoRA training step (--train full: a full one)
    .venv/bin/python -m bench.gpu --arithmetic             # memory per GPU for fine-tuning, by arithmetic
    .venv/bin/python -m bench.gpu --small --device cpu     # the same code on tiny sizes (what the test runs)

1. 1024² (4096 image tokens), 20 Euler steps with CFG 4, bf16 weights (the Lens pipeline's way): seconds per image
   for sampling + VAE decode, median of --repeats after a warm-up, beside Lens's 3.15 s on an H100 (goal ≤ 2.5 s on
   the lent GPU); the GPT-OSS-20B encoding of a prompt (97 + 100 tokens) timed apart.
2. Peak GPU memory for one image, everything resident versus `--offload` (inference/generate.py's Pipeline.visit:
   text encoder, denoiser and VAE each on the GPU only for their own part).
3. `--train lora|full`: one training step of lens-3.8b at 1024² with 100 text tokens, as configs/lens-lora.yaml
   and configs/lens-finetune.yaml train it on one GPU (their LoRA, AdamW, clipping and EMA settings, micro-batch
   6): flow-matching loss under bf16 autocast, activation checkpointing per block. Step time (median after
   warm-up), peak memory, MFU against --peak-tflops. The full step needs ~94 GiB at batch 6 by arithmetic (86 at
   batch 1); where batch 1 runs out of memory too, the row says it does not fit on one GPU and gives the FSDP
   arithmetic instead (`--arithmetic`: memory_arithmetic's table).
Models are random (no weights can be downloaded here): lens-3.8b from its preset, the VAE from the release's
vae/config.json, GPT-OSS-20B from its published shape, all built on the meta device and initialised on the GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench.report, also for `python bench/gpu.py`
from bench.report import emit, row  # noqa: E402

LENS_H100_SECONDS = 3.15  # Lens paper: 1024², 20 steps with CFG, per image on an H100
TURBO_H100_SECONDS = 0.84  # Lens paper: Lens-Turbo, 1024², 4 steps without CFG, per image on an H100
GPT_OSS_20B = dict(num_hidden_layers=24, hidden_size=2880, intermediate_size=2880, num_attention_heads=64,
                   num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4,
                   vocab_size=201088, sliding_window=128)
TINY_GPT_OSS = dict(num_hidden_layers=24, hidden_size=32, intermediate_size=32, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, vocab_size=300,
                    sliding_window=8)
PROMPT_TOKENS = 97 + 100  # Lens's template prefix + a ~75-word dense prompt and the suffix
TEXT_TOKENS = PROMPT_TOKENS - 97  # what the denoiser reads: the features after Lens's 97-token offset
SMALL = {"depth": 2, "hidden": 128, "heads": 2, "text_dim": 32}  # --small: lens-3.8b's code at CPU sizes
H100_BF16_TFLOPS = 989.0  # H100 / H200 SXM, dense bf16 (no sparsity): the MFU denominator by default
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRAIN_CONFIGS = {"lora": "lens-lora.yaml", "full": "lens-finetune.yaml"}  # --train measures their step
WARMUP_STEPS = 2  # the first step allocates AdamW's state and picks kernels


def _random_init(module: torch.nn.Module, device, dtype, std: float = 0.02) -> torch.nn.Module:
    module = module.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
        for name, b in module.named_buffers():
            if "running_var" in name:
                b.fill_(1.0)
            elif b.is_floating_point():
                b.zero_()
    return module.eval().requires_grad_(False)


class RandomIdsEncoder:
    """GPT-OSS run on PROMPT_TOKENS random ids per prompt, features after Lens's 97-token offset at layers 5, 11,
    17, 23: the text encoder's compute and memory without a tokenizer (inference/text.py does the real one)."""

    def __init__(self, model, layers=(5, 11, 17, 23), offset: int = 97):
        self.model, self.layers, self.offset = model, tuple(layers), offset
        self.dim, self.spec = model.config.hidden_size, "random-gpt-oss"

    def identity(self) -> dict:
        return {"text_encoder": self.spec}

    @torch.no_grad()
    def encode(self, prompts):
        device = next(self.model.parameters()).device
        ids = torch.randint(0, self.model.config.vocab_size, (len(prompts), PROMPT_TOKENS), device=device)
        out = self.model.model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        features = torch.cat([out[i + 1] for i in self.layers], dim=-1)[:, self.offset:].float()
        return features, torch.ones(features.shape[:2], dtype=torch.bool, device=device)


def build(args, device):
    from diffusers import AutoencoderKLFlux2
    from transformers import GptOssConfig, GptOssForCausalLM

    from inference.codecs import Flux2Codec
    from inference.config import get_preset
    from inference.lens_format import RELEASE_CONFIGS
    from inference.mmdit import MMDiT

    dtype = torch.bfloat16
    home = torch.device("cpu") if args.offload else device
    cfg = get_preset("lens-3.8b")
    vae_config = json.loads((RELEASE_CONFIGS / "vae_config.json").read_text())
    text = dict(GPT_OSS_20B)
    if args.small:  # the same code on sizes a CPU runs in seconds
        cfg = cfg.model_copy(update=SMALL)
        vae_config.update(block_out_channels=[8, 8, 8, 8], norm_num_groups=4)
        text = dict(TINY_GPT_OSS)
    with torch.device("meta"):
        model = MMDiT(cfg)
        vae = AutoencoderKLFlux2.from_config({k: v for k, v in vae_config.items() if not k.startswith("_")})
        gpt = GptOssForCausalLM(GptOssConfig(**text, layer_types=None))
    model = _random_init(model, home, dtype)
    vae = _random_init(vae, home, dtype, std=0.01)
    gpt = _random_init(gpt, home, dtype)
    return model, Flux2Codec("random", vae=vae), RandomIdsEncoder(gpt)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- memory arithmetic ------------------------------------------------------------------------------------------
# Bytes one block's autograd keeps per token per unit of width D, counted with torch.autograd.graph's
# saved_tensors_hooks on one JointBlock under bf16 autocast (CPU, SDPA's flash kernel, each storage once; within
# 2 % from D = 128 to 1536, at lens-3.8b's M = 8/3·D): bf16 weights (FSDP's bf16 gather, LoRA's bf16 base) 72·D;
# fp32 weights (one GPU under autocast) 88·D, the RMSNorms' outputs staying fp32.
SAVED_BYTES_PER_D = {"bf16": 72, "fp32": 88}
GIB = 2**30
ARITHMETIC_CASES = [("full", 1, 1024, 1), ("full", 1, 1024, 6), ("full", 8, 512, 24), ("full", 8, 1024, 6),
                    ("full", 32, 1024, 6), ("lora", 1, 512, 24), ("lora", 1, 1024, 6), ("lora", 1, 1024, 1)]


def param_counts(model_cfg, lora_cfg=None) -> tuple[int, int, int]:
    """(all base parameters, one block's, the adapters') of the model, counted on the meta device."""
    from inference.mmdit import MMDiT
    from training import lora

    with torch.device("meta"):
        model = MMDiT(model_cfg)
    total, block = (sum(p.numel() for p in m.parameters()) for m in (model, model.transformer_blocks[0]))
    adapters = 0
    if lora_cfg is not None:
        model = lora.add_adapters(model, lora_cfg, seed=0)
        adapters = sum(p.numel() for n, p in model.named_parameters() if lora.is_adapter(n))
    return total, block, adapters


def memory_arithmetic(model_cfg, mode: str, gpus: int, size: int, batch: int, lora_cfg=None, ema: bool = True,
                      text_tokens: int = TEXT_TOKENS) -> dict[str, float]:
    """GiB per GPU of one training step, by arithmetic (not measured): {states, weights, activations, total}.

    full, gpus > 1: FSDP2, fully_shard per block (training/parallel.py). states: fp32 master weights 4 B, fp32
        grads 4 B, AdamW's two moments 8 B and (`ema`, ema.device: same) the fp32 EMA 4 B per parameter, all
        sharded over the GPUs. weights in flight: two blocks gathered in bf16 (the one computing, the one
        prefetched), the non-block weights gathered with the root, one block's unsharded fp32 gradient before its
        reduce-scatter.
    full, gpus == 1: the same states unsharded; weights: autocast's bf16 copy of every weight (2 B), cached until
        the forward ends.
    lora (DDP or one GPU: the same on every GPU): weights: the bf16 base, 2 B per parameter, replicated; states:
        the fp32 adapters, their grads, AdamW and EMA, 20 B per adapter parameter.
    activations, with activation checkpointing per block: every block's input streams, (B, N + L, D) in bf16,
        plus the one block being recomputed: its saved tensors (SAVED_BYTES_PER_D · D a token), counted twice for
        the gradients of the same size in flight during its backward.
    Not counted: the CUDA context and NCCL buffers (~1–3 GiB, outside torch's allocator), fragmentation, the
    loss's (B, C, H, W) tensors, DDP's gradient buckets (the adapters' 4 B again), LoRA's own activations (r per
    token and target: ~1 % of a block's). N = (size / 8 / patch)² image tokens, L = `text_tokens`.
    """
    total, block, adapters = param_counts(model_cfg, lora_cfg if mode == "lora" else None)
    tokens = batch * ((size // 8 // model_cfg.patch) ** 2 + text_tokens)
    d = model_cfg.hidden
    if mode == "lora":
        states, weights, kind = (16 + 4 * ema) * adapters, 2 * total, "bf16"
    elif gpus == 1:
        states, weights, kind = (16 + 4 * ema) * total, 2 * total, "fp32"
    else:
        rest = total - model_cfg.depth * block
        states, weights, kind = (16 + 4 * ema) * total / gpus, 2 * (2 * block + rest) + 4 * block, "bf16"
    activations = model_cfg.depth * tokens * d * 2 + 2 * tokens * SAVED_BYTES_PER_D[kind] * d
    parts = {"states": states / GIB, "weights": weights / GIB, "activations": activations / GIB}
    return {**parts, "total": sum(parts.values())}


def arithmetic_table(model_cfg, lora_cfg) -> str:
    """ARITHMETIC_CASES as a markdown table (bench/README.md's)."""
    lines = ["| training | GPUs | image | micro-batch | states | weights | activations | total GiB / GPU |",
             "|---|---|---|---|---|---|---|---|"]
    for mode, gpus, size, batch in ARITHMETIC_CASES:
        m = memory_arithmetic(model_cfg, mode, gpus, size, batch, lora_cfg)
        how = (f"LoRA r {lora_cfg.rank}, bf16 base" if mode == "lora" else
               "full, one GPU" if gpus == 1 else "full, FSDP2")
        lines.append(f"| {how} | {'any' if mode == 'lora' else gpus} | {size}² | {batch} | {m['states']:.1f} | "
                     f"{m['weights']:.1f} | {m['activations']:.1f} | **{m['total']:.1f}** |")
    return "\n".join(lines)


# -- training ---------------------------------------------------------------------------------------------------
def train_setup(mode: str, small: bool):
    """The shipped config of `mode` and the model it fine-tunes (lens-3.8b: what its init_from holds)."""
    from inference.config import get_preset
    from pipelines.config import load_section

    cfg = load_section("train", str(CONFIGS / TRAIN_CONFIGS[mode]), [])
    model_cfg = get_preset("lens-3.8b")
    return cfg, model_cfg.model_copy(update=SMALL) if small else model_cfg


def build_trainable(mode: str, cfg, model_cfg, device) -> torch.nn.Module:
    """A random MMDiT as the trainer holds it on one GPU (training/model_init.py): LoRA's fp32 adapters on a bf16
    base (also on a CPU here, to run the GPU's code path), or every weight trainable in fp32; AC per block."""
    from inference.mmdit import MMDiT
    from training import lora
    from training.parallel import apply_activation_checkpointing

    with torch.device("meta"):
        model = MMDiT(model_cfg)
    if mode == "lora":
        model = lora.add_adapters(model, cfg.lora, cfg.seed)
    model = _random_init(model, device, torch.float32).train()
    for name, p in model.named_parameters():
        p.requires_grad_(mode == "full" or lora.is_adapter(name))
    if mode == "lora":
        lora.cast_base(model, torch.bfloat16)
    apply_activation_checkpointing(model)
    return model


def measure_training(mode: str, cfg, model_cfg, device, batch: int, size: int, repeats: int,
                     peak_tflops: float) -> dict:
    """The trainer's step (training/trainer.py's train_step, without its cross-rank sums): the flow-matching loss
    under bf16 autocast, backward, clip, AdamW, EMA; timed over `repeats` steps after WARMUP_STEPS."""
    from inference.flow import RectifiedFlow
    from training.ema import EMA
    from training.metrics import memory_gb, train_flops
    from training.parallel import autocast
    from training.trainer import build_optimizer, grad_norm_and_clip

    model = build_trainable(mode, cfg, model_cfg, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = build_optimizer(model, cfg.optim, device)
    ema = EMA(model, cfg.ema.decay, cfg.ema.device, cfg.ema.every)
    flow = RectifiedFlow(prediction=model_cfg.prediction)
    side = size // 8  # FLUX.2 VAE latents: 1/8 of the image side
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(batch, model_cfg.in_channels, side, side, generator=g, device=device)  # (B, 32, 128, 128)
    text = torch.randn(batch, TEXT_TOKENS, model_cfg.text_layers * model_cfg.text_dim, generator=g,
                       device=device)  # (B, 100, 4 · 2880)
    mask = torch.ones(batch, TEXT_TOKENS, dtype=torch.bool, device=device)
    if device.type == "cuda":  # the model is resident; the build's transient fp32 copy (LoRA) is not counted
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for step in range(1, WARMUP_STEPS + repeats + 1):
        sync(device)
        start = time.perf_counter()
        with autocast(device, bf16=True, fsdp=False):
            loss = flow.loss(model, x0, text, mask, generator=g).mean()
        loss.backward()
        grad_norm_and_clip(params, cfg.optim.grad_clip)
        optim.step()
        ema.update(step)
        optim.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))  # a host sync, outside the timing
    step_s = statistics.median(times[WARMUP_STEPS:])
    image_tokens = (side // model_cfg.patch) ** 2
    flops = train_flops(model_cfg, batch, image_tokens, TEXT_TOKENS, frozen=mode == "lora")
    return {"train": mode, "size": size, "batch": batch, "image_tokens": image_tokens, "text_tokens": TEXT_TOKENS,
            "trainable": sum(p.numel() for p in params), "step_s": step_s, "peak_gib": round(memory_gb(device), 2),
            "tflops": flops / step_s / 1e12, "mfu": flops / step_s / (peak_tflops * 1e12), "loss": losses[-1],
            "repeats": repeats}


def fit(mode: str, cfg, model_cfg, device, batches: list[int], size: int, repeats: int, peak_tflops: float):
    """(the step at the first of `batches` that fits in memory, or None; the batches tried)."""
    tried = []
    for batch in batches:
        tried.append(batch)
        try:
            return measure_training(mode, cfg, model_cfg, device, batch, size, repeats, peak_tflops), tried
        except torch.cuda.OutOfMemoryError:
            pass
        gc.collect()  # the model and optimizer went with the exception's frames; give their blocks back
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return None, tried


def train_rows(args, device, name: str) -> list[dict]:
    cfg, model_cfg = train_setup(args.train, args.small)
    batch = args.batch or cfg.batch_size_for(args.size)
    batches = [batch, 1] if args.train == "full" and batch > 1 else [batch]  # full: "as far as it fits"
    result, tried = fit(args.train, cfg, model_cfg, device, batches, args.size, args.repeats, args.peak_tflops)
    label = f"LoRA r {cfg.lora.rank}, bf16 base" if cfg.lora else "full fine-tune, fp32 master + AdamW"
    ema = cfg.ema.device == "same"
    if result is None:
        sharded = memory_arithmetic(model_cfg, args.train, 8, args.size, batch, cfg.lora, ema)
        print(json.dumps({"train": args.train, "fits": False, "tried": tried, "fsdp_8_gpus": sharded}))
        return [row("gpu", f"train step, {label}, {args.size}²: does not fit on one GPU", float("nan"), "s",
                    note=f"{name}: out of memory at batch {', '.join(map(str, tried))}; by arithmetic, FSDP2 over "
                    f"8 GPUs needs {sharded['total']:.1f} GiB each at batch {batch} (bench.gpu --arithmetic)")]
    one = memory_arithmetic(model_cfg, args.train, 1, args.size, result["batch"], cfg.lora, ema)
    print(json.dumps({**result, "arithmetic_gib": one}))
    what = f"train step, {label}, {args.size}², batch {result['batch']}"
    how = f"{name}; AC per block, bf16 autocast, AdamW, clip, EMA; median of {args.repeats} after {WARMUP_STEPS}"
    cuda = device.type == "cuda"
    return [
        row("gpu", what, result["step_s"], "s", note=how),
        row("gpu", f"peak GPU memory, {what}", result["peak_gib"], "GiB", peer=one["total"] if cuda else None,
            peer_name="arithmetic (bench.gpu --arithmetic)", note=name if cuda else "cpu: the process's peak RSS"),
        row("gpu", f"MFU, {what}", 100 * result["mfu"], "%", note=f"{result['tflops']:.1f} TFLOP/s of "
            f"{args.peak_tflops:.0f} (bf16 dense); training.metrics.train_flops, frozen={cfg.lora is not None}"),
    ]


# -- inference --------------------------------------------------------------------------------------------------
def inference_rows(args, device, name: str) -> list[dict]:
    from inference.generate import Pipeline

    model, codec, encoder = build(args, device)
    pipe = Pipeline(model, codec, encoder, device=device, offload=args.offload)
    prompt = ["a dense caption"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    pipe.generate(prompt, args.size, args.size, steps=args.steps, cfg=args.cfg, seeds=[0])  # warm-up, peak memory
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    encode, sample = [], []
    for i in range(args.repeats):
        sync(device)
        start = time.perf_counter()
        texts = pipe.encode(prompt + [""])
        sync(device)
        encode.append(time.perf_counter() - start)
        start = time.perf_counter()
        with pipe.visit(pipe.model):
            z = pipe.latents(prompt, args.size, args.size, args.steps, args.cfg, [i], texts=texts[:1],
                             neg=texts[1])
        with pipe.visit(codec.vae):
            codec.decode(z)
        sync(device)
        sample.append(time.perf_counter() - start)
    result = {"device": name, "size": args.size, "steps": args.steps, "cfg": args.cfg, "offload": args.offload,
              "sample_and_decode_s": statistics.median(sample), "encode_s": statistics.median(encode),
              "peak_gib": round(peak, 2), "repeats": args.repeats}
    print(json.dumps(result))
    mode = "with --offload" if args.offload else "all resident"
    rows = [row("gpu", f"peak GPU memory, 1 image at {args.size}², {mode}", peak, "GiB", goal_of="value",
                note=name)]
    turbo = args.cfg == 1.0  # a distilled student's few steps without guidance, beside Lens-Turbo's figure
    if args.offload:
        return rows
    if turbo:
        rows[0]["figure"] += f", {args.steps} steps without CFG"
        rows.append(row("gpu", f"{args.size}², {args.steps} steps, no CFG (a distilled student), bf16: sampling + "
                        "VAE decode per image", result["sample_and_decode_s"], "s", peer=TURBO_H100_SECONDS,
                        peer_name="Lens-Turbo on an H100 (paper)", goal="<= 0.84", goal_of="value",
                        note=f"{name}; GPT-OSS-20B encode {result['encode_s']:.2f} s apart"))
    else:
        rows.append(row("gpu", f"{args.size}², {args.steps} steps, CFG, bf16: sampling + VAE decode per image",
                        result["sample_and_decode_s"], "s", peer=LENS_H100_SECONDS, peer_name="Lens on an H100 "
                        "(paper)", goal="<= 2.5", goal_of="value", note=f"{name}; GPT-OSS-20B encode "
                        f"{result['encode_s']:.2f} s apart"))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=4.0, help="guidance scale; 1 = none (a distilled student)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--offload", action="store_true", help="measure the --offload mode (one mode a process)")
    parser.add_argument("--small", action="store_true", help="tiny sizes, for checking the script on a CPU")
    parser.add_argument("--train", choices=list(TRAIN_CONFIGS), help="measure a training step instead (one mode a "
                        "process): lora = configs/lens-lora.yaml's, full = configs/lens-finetune.yaml's")
    parser.add_argument("--batch", type=int, help="--train's micro-batch; default the config's for --size (6)")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS,
                        help="the GPU's dense bf16 peak for MFU (default: H100 / H200 SXM)")
    parser.add_argument("--arithmetic", action="store_true", help="print the memory-per-GPU arithmetic of "
                        "fine-tuning (no device used) and exit")
    args = parser.parse_args(argv)
    if args.arithmetic:
        cfg, model_cfg = train_setup("lora", args.small)
        print(arithmetic_table(model_cfg, cfg.lora))
        return 0
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    emit(train_rows(args, device, name) if args.train else inference_rows(args, device, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
