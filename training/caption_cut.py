"""Random-length captions, cut per draw: a training mix's `dense@random` (training/caption_variants.py) reads the
stored `dense` caption of each sample, cuts its text to a uniformly drawn number of words (1 … all of them) and
encodes the cut with the shard set's own text encoder (the one its encoders.json names), so the features are
exactly what inference computes for that shorter prompt.

    cut = CaptionCut(shards.encoders)                    # the encoder loads on the first call
    feats = cut.encode(["A large red circle", ...])      # [(L_i, D) bfloat16, ...], as read_sample's text

Why not cut the stored features instead: every text encoder here lets each kept token see the words cut off (MiniLM
attends both ways; GPT-OSS's template tokens after the prompt attend to all of it), so a cut of the features is not
the features of the cut text. Cost: one text-encoder pass per batch in the loader (measured in
docs/ablations/caption-density/: the random-length arm's wall time beside the others').
"""

from __future__ import annotations

import torch

from training.caption_variants import truncate_words

CHUNK = 16  # cuts per text-encoder pass


def draw_cut(text: str, u: float) -> tuple[str, int]:
    """The text cut to N words, N uniform on 1 … words(text) from u in [0, 1); (cut text, N). An empty text stays."""
    words = len(text.split())
    if words == 0:
        return text, 0
    n = 1 + min(int(u * words), words - 1)
    return truncate_words(text, n), n


class CaptionCut:
    def __init__(self, encoders: dict, device: str | torch.device | None = None):
        self.key = encoders["text"]
        self.device = device
        self._encoder = None

    @property
    def encoder(self):
        if self._encoder is None:  # lazily: a mix without a random-length variant never loads it
            from inference.text import load_text_encoder

            date = (self.key.get("template") or {}).get("date")
            device = self.device or (f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
            self._encoder = load_text_encoder(self.key["text_encoder"], device=device,
                                              dtype=getattr(torch, self.key.get("compute_dtype", "float32")),
                                              date=date)
        return self._encoder

    def encode(self, texts: list[str]) -> list[torch.Tensor]:
        """Unpadded (L_i, D) bfloat16 features of each text, on the CPU (the stored features' dtype and place)."""
        # Cuts are uniform in length, so one padded batch would spend about half its tokens on padding: encode
        # them shortest first in chunks of CHUNK (each padded to its own longest), then restore the order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i].split()))
        out: list[torch.Tensor | None] = [None] * len(texts)
        for start in range(0, len(order), CHUNK):
            chunk = order[start:start + CHUNK]
            features, mask = self.encoder.encode([texts[i] for i in chunk])  # (c, L, D), (c, L)
            for i, row, n in zip(chunk, features, mask.sum(1).tolist()):
                out[i] = row[:n].to(torch.bfloat16).cpu()
        return out

