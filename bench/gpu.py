"""GPU figures of the released Lens architecture at full size, random weights, one process (bench/gpu.sh runs it).

    .venv/bin/python -m bench.gpu                          # on a CUDA machine: lens-3.8b, FLUX.2 VAE, GPT-OSS-20B
    .venv/bin/python -m bench.gpu --small --device cpu     # the same code on tiny sizes (what the test runs)

1. 1024² (4096 image tokens), 20 Euler steps with CFG 4, bf16 weights (the Lens pipeline's way): seconds per image
   for sampling + VAE decode, median of --repeats after a warm-up, beside Lens's 3.15 s on an H100 (goal ≤ 2.5 s on
   the lent GPU); the GPT-OSS-20B encoding of a prompt (97 + 100 tokens) timed apart.
2. Peak GPU memory for one image, everything resident versus `--offload` (inference/generate.py's Pipeline.visit:
   text encoder, denoiser and VAE each on the GPU only for their own part).
Models are random (no weights can be downloaded here): lens-3.8b from its preset, the VAE from the release's
vae/config.json, GPT-OSS-20B from its published shape, all built on the meta device and initialised on the GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench.report, also for `python bench/gpu.py`
from bench.report import emit, row  # noqa: E402

LENS_H100_SECONDS = 3.15  # Lens paper: 1024², 20 steps with CFG, per image on an H100
GPT_OSS_20B = dict(num_hidden_layers=24, hidden_size=2880, intermediate_size=2880, num_attention_heads=64,
                   num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4,
                   vocab_size=201088, sliding_window=128)
TINY_GPT_OSS = dict(num_hidden_layers=24, hidden_size=32, intermediate_size=32, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, vocab_size=300,
                    sliding_window=8)
PROMPT_TOKENS = 97 + 100  # Lens's template prefix + a ~75-word dense prompt and the suffix


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
        cfg = cfg.model_copy(update={"depth": 2, "hidden": 128, "heads": 2, "text_dim": 32})
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--offload", action="store_true", help="measure the --offload mode (one mode a process)")
    parser.add_argument("--small", action="store_true", help="tiny sizes, for checking the script on a CPU")
    args = parser.parse_args(argv)
    from inference.generate import Pipeline

    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    model, codec, encoder = build(args, device)
    pipe = Pipeline(model, codec, encoder, device=device, offload=args.offload)
    prompt = ["a dense caption"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    pipe.generate(prompt, args.size, args.size, steps=args.steps, cfg=4.0, seeds=[0])  # warm-up and peak memory
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
            z = pipe.latents(prompt, args.size, args.size, args.steps, 4.0, [i], texts=texts[:1], neg=texts[1])
        with pipe.visit(codec.vae):
            codec.decode(z)
        sync(device)
        sample.append(time.perf_counter() - start)
    result = {"device": name, "size": args.size, "steps": args.steps, "offload": args.offload,
              "sample_and_decode_s": statistics.median(sample), "encode_s": statistics.median(encode),
              "peak_gib": round(peak, 2), "repeats": args.repeats}
    print(json.dumps(result))
    mode = "with --offload" if args.offload else "all resident"
    rows = [row("gpu", f"peak GPU memory, 1 image at {args.size}², {mode}", peak, "GiB", goal_of="value",
                note=name)]
    if not args.offload:
        rows.append(row("gpu", f"{args.size}², {args.steps} steps, CFG, bf16: sampling + VAE decode per image",
                        result["sample_and_decode_s"], "s", peer=LENS_H100_SECONDS, peer_name="Lens on an H100 "
                        "(paper)", goal="<= 2.5", goal_of="value", note=f"{name}; GPT-OSS-20B encode "
                        f"{result['encode_s']:.2f} s apart"))
    emit(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
