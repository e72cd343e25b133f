"""Perplexity as TEAL reports it: WikiText-2, seeded random windows, loss on the last tokens only.

The paper: 128 random samples of 2048 tokens, loss on the last 512 of each. Conditioning on
1536 tokens of real context makes every scored token a long-context prediction, and the
prefill protocol decides which of those context tokens are sparsified.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .data import wikitext_samples


@torch.no_grad()
def perplexity(model: nn.Module, tok, samples: int = 128, seq_len: int = 2048, eval_len: int = 512,
               seed: int = 0, split: str = "test", progress: bool = True) -> dict:
    """WikiText-2 perplexity of `model` (sparsified or not) under the protocol above."""
    from tqdm.auto import tqdm

    if not 0 < eval_len < seq_len:
        raise ValueError(f"eval_len must be in (0, seq_len={seq_len}), got {eval_len}")
    windows = wikitext_samples(tok, samples, seq_len, seed, split)
    device = next(model.parameters()).device
    nll, n = 0.0, 0
    per_sample = []
    for ids in tqdm(windows, desc="perplexity", disable=not progress):
        logits = model(ids[None].to(device), use_cache=False).logits[0, -eval_len - 1:-1].float()
        if not torch.isfinite(logits).all():
            raise FloatingPointError("non-finite logits: the model (or its sparsity) is broken")
        loss = nn.functional.cross_entropy(logits, ids[-eval_len:].to(device), reduction="sum").item()
        per_sample.append(loss / eval_len)
        nll, n = nll + loss, n + eval_len
    return {"ppl": math.exp(nll / n), "nll": nll / n, "tokens_scored": n,
            "sample_nll": per_sample,
            "protocol": {"data": f"wikitext-2-raw-v1/{split}", "samples": samples, "seq_len": seq_len,
                         "eval_len": eval_len, "seed": seed}}
