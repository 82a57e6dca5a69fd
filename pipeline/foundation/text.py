"""The tiny world's text side: a CLIP BPE tokenizer trained on the prompt corpus, two frozen CLIP encoders."""

from __future__ import annotations

import pandas as pd

from pipeline.config import Config
from pipeline.models.world import build_text_encoder, train_tokenizer


def prompt_corpus(df: pd.DataFrame) -> list[str]:
    cols = [c for c in ("global_prompt", "local_prompt") if c in df.columns]
    return sorted({p for c in cols for p in df[c].dropna().astype(str)})


def build_text_components(cfg: Config, df: pd.DataFrame) -> dict:
    tok = train_tokenizer(prompt_corpus(df), cfg)
    return {
        "tokenizer": tok,
        "tokenizer_2": tok,
        "text_encoder": build_text_encoder(cfg, tok, seed=cfg.seed + 101),
        "text_encoder_2": build_text_encoder(cfg, tok, seed=cfg.seed + 202),
    }
