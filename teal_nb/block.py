"""One decoder layer as a chain of cached stages, for measuring sparsified block outputs fast.

Algorithm 1 evaluates thousands of candidate sparsities per block. Two facts make that cheap:

1. A candidate changes one site. Everything upstream of it is unchanged, so a step on `down`
   recomputes one matmul, a step on `gate` recomputes gate and down, and only q/k/v/o steps
   recompute attention and the whole MLP. `BlockRunner.run(base, thresholds, changed)` starts
   from the cached stages of the accepted state `base` and recomputes from `changed` on.
2. The error is measured on the last positions only (TEAL: the last 25%), and q, o and the MLP
   act on each position independently, so they run on those positions only. Keys and values
   are needed at every position the evaluated queries attend to.

The stages follow transformers' Llama/Mistral/Qwen2 decoder layer exactly (RMSNorm, RoPE,
grouped-query attention, SiLU-gated MLP, the two residual adds); `tests/test_greedy.py` checks
the result against the HF layer under `teal_nb.sparsify`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import SITES
from .models import Site

ATTN_SITES = ("q", "k", "v", "o")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, hd]; cos/sin [B, T, hd] (as the model's rotary embedding returns them)."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


def sparse_range(seq_len: int, prefill: str) -> int:
    """First position whose inputs are sparsified under a prefill protocol (TEAL: the last half)."""
    if prefill == "all":
        return 0
    if prefill == "last_half":
        return seq_len // 2  # as teal_nb.sparsify: positions t // 2 onwards
    raise ValueError(f"the greedy search needs sparse positions: prefill must be 'last_half' or 'all', "
                     f"got {prefill!r}")


class BlockRunner:
    """A decoder layer on fixed dense inputs `x` [B, T, D], evaluated on the last positions.

    `eval_from`: first evaluated position; `sparse_from`: first position whose inputs are
    thresholded (earlier ones stay dense, as under the `last_half` prefill protocol).
    """

    def __init__(self, layer: nn.Module, sites: dict[str, Site], x: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, sparse_from: int, eval_from: int):
        if not 0 <= sparse_from <= eval_from < x.shape[1]:
            raise ValueError(f"need 0 <= sparse_from ({sparse_from}) <= eval_from ({eval_from}) "
                             f"< seq_len ({x.shape[1]}): every evaluated position must be sparse")
        attn = layer.self_attn
        self.layer, self.sparse_from, self.eval_from = layer, sparse_from, eval_from
        cfg = attn.config
        self.head_dim = getattr(attn, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.scaling = getattr(attn, "scaling", self.head_dim ** -0.5)
        self.act = layer.mlp.act_fn
        # Weight (and bias) rows of each site: fused projections are sliced, nothing is copied.
        self.w = {s: site.linear.weight[site.rows] for s, site in sites.items()}
        self.b = {s: None if site.linear.bias is None else site.linear.bias[site.rows]
                  for s, site in sites.items()}
        with torch.no_grad():
            self.x_e = x[:, eval_from:]
            a = layer.input_layernorm(x)                    # attn_in at every position
            self.a_sparse, self.a_e = a[:, sparse_from:], a[:, eval_from:]
            self.cos, self.sin = cos, sin
            # Keys and values of the dense prefix never change: computed once.
            self.prefix = {s: self._proj(a[:, :sparse_from], s) for s in ("k", "v")}
            self.memo: dict = {}
            T, Te = x.shape[1], x.shape[1] - eval_from
            # Query i (absolute position eval_from + i) sees keys 0 .. eval_from + i.
            self.mask = (torch.arange(T, device=x.device)[None, :]
                         <= torch.arange(eval_from, T, device=x.device)[:, None])
            self.Te = Te

    def _proj(self, x: torch.Tensor, site: str, t: float | None = None) -> torch.Tensor:
        if t is not None and t >= 0:
            # hardshrink zeroes |x| <= t in one fused pass: TEAL's rule, as sparse_mask, 3x faster.
            x = F.hardshrink(x, t)
        return F.linear(x, self.w[site], self.b[site])

    def _qkv(self, site: str, t: float, memo: bool = True) -> torch.Tensor:
        """q, k or v (heads, RoPE applied) at threshold t. They read the block's dense input, so
        they depend on their own threshold only: memoised, a step on q costs no q matmul twice."""
        key = (site, t)
        if key in self.memo:
            return self.memo[key]
        e0 = self.eval_from
        if site == "q":
            y = _rope(self._heads(self._proj(self.a_e, "q", t)), self.cos[:, e0:], self.sin[:, e0:])
        else:
            y = self._heads(torch.cat([self.prefix[site], self._proj(self.a_sparse, site, t)], dim=1))
            if site == "k":
                y = _rope(y, self.cos, self.sin)
        if memo:
            self.memo[key] = y
        return y

    def _heads(self, y: torch.Tensor) -> torch.Tensor:
        B, T, _ = y.shape
        return y.view(B, T, -1, self.head_dim).transpose(1, 2)

    @torch.no_grad()
    def run(self, base: dict | None, th: dict[str, float], changed: str | None = None,
            memo: bool = True) -> dict:
        """Stages of the block under thresholds `th` (site -> t; t < 0 keeps everything).

        With `base` (the stages of a state that differs from `th` only at site `changed`), only
        the stages downstream of `changed` are recomputed. Returns the new stages; `["y"]` is the
        block output on the evaluated positions. `memo=False`: do not keep this run's q, k, v
        for later runs (a one-off state, e.g. the uniform point of each row).
        """
        full = base is None
        st = {} if full else dict(base)
        if changed is not None and changed not in SITES:
            raise ValueError(f"unknown site {changed!r}")
        attn_changed = full or changed in ATTN_SITES
        for site in ("q", "k", "v"):
            if full or changed == site:
                st[site] = self._qkv(site, th[site], memo)
        if full or changed in ("q", "k", "v"):
            o = F.scaled_dot_product_attention(st["q"], st["k"], st["v"], attn_mask=self.mask,
                                               scale=self.scaling, enable_gqa=self.n_kv != self.n_heads)
            st["att"] = o.transpose(1, 2).reshape(o.shape[0], self.Te, -1)
        if attn_changed:
            st["h"] = self.x_e + self._proj(st["att"], "o", th["o"])
            st["m"] = self.layer.post_attention_layernorm(st["h"])
        if attn_changed or changed == "gate":
            st["g"] = self._proj(st["m"], "gate", th["gate"])
        if attn_changed or changed == "up":
            st["u"] = self._proj(st["m"], "up", th["up"])
        if changed != "down":
            st["mid"] = self.act(st["g"]) * st["u"]
        st["y"] = st["h"] + self._proj(st["mid"], "down", th["down"])
        return st


def block_error(y: torch.Tensor, target: torch.Tensor, kind: str = "rel_mse") -> float:
    """Error of a block output against the dense one, on the evaluated positions.

    rel_mse  (ours)  ||y - target||^2 / ||target||^2: the perturbation relative to the residual
             stream it is added to. The next layer's RMSNorm divides by that norm, so this is the
             size of the error as the rest of the model sees it, comparable across layers.
    teal_l2  (TEAL's greedyopt.py) the L2 norm over positions of each (sequence, channel),
             averaged: torch.norm(target - y, dim=1).mean(). Not comparable across layers.
    Within one block both rank candidates almost always alike (both grow with the squared error).
    """
    d = y - target
    if kind == "rel_mse":
        return float(d.square().sum(dtype=torch.float64) / target.square().sum(dtype=torch.float64))
    if kind == "teal_l2":
        return float(torch.linalg.vector_norm(d.double(), dim=1).mean())
    raise ValueError(f"block error must be 'rel_mse' or 'teal_l2', got {kind!r}")


__all__ = ["BlockRunner", "block_error", "sparse_range"]
