"""Optional caption embeddings ``text_emb [L, D_t]`` (Phase 2 generic video, or any clip with a caption).

Captions come from the input's sidecar (``"caption"`` in ``<video>.json``) or ``<video>.txt``. The
encoder is Wan's umT5 (transformers ``UMT5EncoderModel`` + its tokenizer) from a local folder, e.g.
the ``text_encoder`` / ``tokenizer`` of a diffusers Wan2.1 checkpoint; the last hidden state of the
caption's real tokens (no padding) is stored in bf16. ``--random-models tiny`` builds a tiny random
``UMT5EncoderModel`` with ``model.text_dim`` channels and tokenises UTF-8 bytes (no tokenizer files
exist offline) -- smoke runs only.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

import torch

from .netutil import random_init, resolve_device

log = logging.getLogger(__name__)

MAX_TOKENS = 512            # Wan's text_len
BYTE_VOCAB = 256 + 2        # random tiny: byte tokens + pad 0 / eos 1 offsets


class TextEncoder:
    def __init__(self, model, tokenize: Callable[[str], torch.Tensor], name: str):
        self.model, self.tokenize, self.name = model.eval(), tokenize, name
        self.device = next(model.parameters()).device

    @property
    def dim(self) -> int:
        return int(self.model.config.d_model)

    @torch.no_grad()
    def __call__(self, caption: str) -> torch.Tensor:
        ids = self.tokenize(caption)[:MAX_TOKENS].to(self.device)
        h = self.model(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None]).last_hidden_state[0]
        return h.float().cpu().to(torch.bfloat16)


def _byte_tokens(text: str) -> torch.Tensor:
    return torch.tensor([b + 2 for b in text.encode("utf-8")] + [1], dtype=torch.long)


def build_text_encoder(path: Optional[str], text_dim: int, random_models: Optional[str], device: str = "auto"
                       ) -> TextEncoder:
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel
    dev = resolve_device(device)
    if path:
        root = Path(path)
        model_dir = root / "text_encoder" if (root / "text_encoder").is_dir() else root
        tok_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else root
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        model = UMT5EncoderModel.from_pretrained(str(model_dir), torch_dtype=dtype).to(dev)
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        enc = TextEncoder(model, lambda t: tokenizer(t, return_tensors="pt").input_ids[0], str(path))
    elif random_models:
        log.warning("text: RANDOM tiny umT5 encoder with byte tokens (--random-models %s) -- smoke runs only",
                    random_models)
        heads = 4 if text_dim % 4 == 0 else 1
        cfg = UMT5Config(vocab_size=BYTE_VOCAB, d_model=text_dim, d_kv=text_dim // heads, d_ff=2 * text_dim,
                         num_layers=1, num_heads=heads)
        with random_init():
            model = UMT5EncoderModel(cfg)
        enc = TextEncoder(model.to(dev), _byte_tokens, f"random-{random_models}")
    else:
        raise ValueError("captions need --text-encoder PATH (umT5 folder) or --random-models tiny")
    if enc.dim != text_dim:
        raise ValueError(f"--text-encoder {path}: d_model {enc.dim} != model.text_dim {text_dim}")
    return enc


__all__ = ["TextEncoder", "build_text_encoder", "MAX_TOKENS"]
