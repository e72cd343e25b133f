"""A gpt-fast-style decoder for Llama-family models, dense or TEAL-sparse, for latency.

Why not the Hugging Face model: its Python-side bookkeeping costs more than the GPU work of a
one-token step. Here a decode step is a plain function of (token, position) over static
tensors: fused QKV and gate/up weights, a static KV cache, precomputed RoPE tables. On a GPU it
is compiled with `torch.compile(mode="reduce-overhead")`, which captures the whole step as one
CUDA graph (gpt-fast's recipe); on a CPU it runs eagerly.

    dec = Decoder.from_hf(model)                       # a loaded HF Llama / Mistral / Qwen2
    dec = Decoder.random("llama-3-8b", "bfloat16", "cuda")   # random weights of a preset's shape
    dec.set_sparsity(thresholds, backend="triton")     # thresholds [L, 7] in SITES order
    out = dec.generate(prompt_ids, max_new_tokens=200)

Backends for the seven projections (lm_head always dense):
  dense   F.linear (cuBLAS on a GPU)
  torch   zero the entries with |x| <= t, then F.linear: any device, the reference
  triton  teal_nb.kernels.sparse_gemv: threshold fused into an input-sparse GEMV that skips
          the weight columns of zeroed entries; fused QKV (3 thresholds) and gate/up (2)

Decode steps (one new token) are sparse; the prompt (prefill) follows a stated protocol:
"none" (dense, the default, as in TEAL's speed numbers), "last_half" or "all".

The fused step (`fused_step`, on by default): when all four projections of a one-token step run
through the kernels (backend "triton", or "dense" with every projection in `dense_triton`) and
attention is the fused kernel, the step keeps its residual stream in fp32 and calls
`sparse_gemv_into`: qkv and gate/up compute their RMSNorm as they read the stream, o and down add
into it (no residual add, no norm kernel, no split-K tail), down computes SiLU x up from the
gate/up buffer. Five launches per layer instead of nine; the residual is rounded less often than
HF's bf16 one, so logits differ from the unfused step by bf16 rounding (tests: within 2e-2).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import SITES, Preset, check_prefill, get_preset
from .kernels.gemv import norm_input

BACKENDS = ("dense", "torch", "triton")
# The four projections of a block, the sites (columns of SITES) each one's output segments hold.
PROJ_SITES = {"qkv": (0, 1, 2), "o": (3,), "gate_up": (4, 5), "down": (6,)}
PROJ_STATE = {"qkv": "attn_in", "o": "attn_out", "gate_up": "mlp_in", "down": "mlp_mid"}


def _dtype(d) -> torch.dtype:
    from .models import _dtype as md

    return md(d)


@dataclass(frozen=True)
class DecoderConfig:
    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    attention_bias: bool = False
    tie_embeddings: bool = False

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    def proj_shape(self, proj: str) -> tuple[int, int]:
        """(N, K) of a block's (fused) projection."""
        return {"qkv": (self.q_size + 2 * self.kv_size, self.hidden), "o": (self.hidden, self.q_size),
                "gate_up": (2 * self.intermediate, self.hidden), "down": (self.hidden, self.intermediate)}[proj]

    def site_params(self) -> dict[str, int]:
        """Weights behind each site's input, per layer (a skipped entry saves its column of these)."""
        h, q, kv, i = self.hidden, self.q_size, self.kv_size, self.intermediate
        return {"q": q * h, "k": kv * h, "v": kv * h, "o": h * q, "gate": i * h, "up": i * h, "down": h * i}

    @classmethod
    def from_preset(cls, p: Preset | str, n_layers: int | None = None) -> "DecoderConfig":
        p = get_preset(p) if isinstance(p, str) else p
        return cls(n_layers or p.n_layers, p.hidden, p.intermediate, p.n_heads, p.n_kv_heads, p.head_dim,
                   p.vocab, p.rope_theta, p.norm_eps, p.attention_bias, p.tie_embeddings)

    @classmethod
    def from_hf(cls, config) -> "DecoderConfig":
        c = config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        rope = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", 10000.0))
        # Qwen2 has q/k/v biases without an `attention_bias` flag.
        bias = bool(getattr(c, "attention_bias", False)) or c.model_type == "qwen2"
        return cls(c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
                   c.num_key_value_heads, head_dim, c.vocab_size, float(rope), float(c.rms_norm_eps), bias,
                   bool(getattr(c, "tie_word_embeddings", False)))


def _argmax_chunk(vocab: int) -> int:
    """A divisor of the vocabulary size between 256 and 2048, near 4 sqrt(V) (0: none)."""
    best = 0
    for c in range(256, 2049):
        if vocab % c == 0 and (not best or abs(c - 4 * vocab ** 0.5) < abs(best - 4 * vocab ** 0.5)):
            best = c
    return best


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """As in HF Llama: normalize in fp32, cast back, then scale."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _sparse_mask(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """TEAL's rule, compared in fp32 so that the threshold is not rounded to x's dtype."""
    return x.masked_fill(x.float().abs() <= t, 0)


class Block(nn.Module):
    """One decoder layer's weights: fused qkv [Nq + 2 Nkv, H], o, fused gate_up [2 I, H], down."""

    def __init__(self, cfg: DecoderConfig, dtype, device):
        super().__init__()

        def w(*shape):
            return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)

        self.qkv = w(*cfg.proj_shape("qkv"))
        self.o = w(*cfg.proj_shape("o"))
        self.gate_up = w(*cfg.proj_shape("gate_up"))
        self.down = w(*cfg.proj_shape("down"))
        self.qkv_bias = w(cfg.proj_shape("qkv")[0]) if cfg.attention_bias else None
        self.attn_norm = w(cfg.hidden)
        self.mlp_norm = w(cfg.hidden)
        # The Triton backend's layouts (W^T [K, N]) of the four projections, made by
        # prepare_triton(). Buffers, so that a CUDA graph reads them in place (a plain tensor
        # attribute could be copied into the graph's static inputs at every replay).
        for p in ("qkv", "o", "gate_up", "down"):
            self.register_buffer(f"{p}_t", None, persistent=False)

    @property
    def prepared(self) -> bool:
        return self.qkv_t is not None


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, dtype="bfloat16", device="cpu", max_seq_len: int = 256,
                 batch: int = 1):
        super().__init__()
        dtype, device = _dtype(dtype), torch.device(device)
        self.cfg, self.dtype, self.device = cfg, dtype, device
        e = lambda *s: nn.Parameter(torch.empty(*s, dtype=dtype, device=device), requires_grad=False)  # noqa: E731
        self.embed = e(cfg.vocab, cfg.hidden)
        self.layers = nn.ModuleList([Block(cfg, dtype, device) for _ in range(cfg.n_layers)])
        self.norm = e(cfg.hidden)
        self.lm_head = self.embed if cfg.tie_embeddings else e(cfg.vocab, cfg.hidden)
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        self.rope_scaling = 1.0
        # Sparsity state: thresholds [L, 7] (SITES order; -1 keeps everything), counters of zeroed
        # entries per (layer, site) for eager runs, the backend and the prefill protocol.
        self.register_buffer("thresholds", torch.full((cfg.n_layers, len(SITES)), -1.0, device=device),
                             persistent=False)
        self.register_buffer("stats", torch.zeros(cfg.n_layers, len(SITES), 2, dtype=torch.float64,
                                                  device=device), persistent=False)
        self.backend = "dense"
        self.prefill = "none"
        self.count = False          # count zeroed entries (eager runs only: it costs kernels)
        self.record = None          # dict (layer, state) -> list of inputs, for calibration
        # One-token attention: "fused" (teal_nb.decode_attention: RoPE, cache write and attention
        # in one Triton launch), "torch" (matmuls + softmax, any shape), "auto" (fused on a GPU;
        # "fused" on a CPU needs TRITON_INTERPRET=1, as the tests do).
        self.attention = "auto"
        # Dense projections read through W^T [K, N] (the Triton layout, x @ W^T) instead of
        # F.linear's W [N, K], per projection: cuBLAS picks other kernels for the other layout
        # (chosen by measurement in decode_bench.choose_dense_layout; needs prepare_triton()).
        self.dense_wt: set[str] = set()
        # Dense projections run by our kernel with every channel kept (a negative threshold),
        # one token at a time, where it beats cuBLAS (also chosen by measurement there); down
        # then takes the gate/up output and computes SiLU x up itself, one launch less per layer.
        self.dense_triton: set[str] = set()
        self.register_buffer("keep_all", torch.full((3,), -1.0, device=device), persistent=False)
        # One-token steps through sparse_gemv_into with the norms and residual adds inside the
        # kernels, when every projection runs through them (see the module's docstring).
        self.fused_step = True
        # Greedy argmax over the vocabulary in two reductions (chunks of this size, then the
        # chunks' maxima): one reduction over Llama-3's 128K logits ran as a single program.
        self.argmax_chunk = _argmax_chunk(cfg.vocab)
        self._compiled = None
        self.setup_cache(max_seq_len, batch)
        self.set_rope()

    # ------------------------------------------------------------------ construction

    @classmethod
    def random(cls, preset: Preset | str, dtype="bfloat16", device="cpu", max_seq_len: int = 256,
               n_layers: int | None = None, seed: int = 0, std: float = 0.02) -> "Decoder":
        """Random weights of a preset's shape, made where they live (an 8B model: seconds on a GPU)."""
        cfg = DecoderConfig.from_preset(preset, n_layers)
        dec = cls(cfg, dtype, device, max_seq_len)
        gen = torch.Generator(device=dec.device).manual_seed(seed)
        with torch.no_grad():
            for name, p in dec.named_parameters():
                if name.endswith("norm"):
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.normal_(0.0, std, generator=gen)
        return dec

    @classmethod
    @torch.no_grad()
    def from_hf(cls, model: nn.Module, max_seq_len: int = 256, dtype=None, device=None) -> "Decoder":
        """Copy a loaded HF Llama-family causal LM's weights (q/k/v and gate/up fused)."""
        from .models import model_sites

        cfg = DecoderConfig.from_hf(model.config)
        ref = next(model.parameters())
        dec = cls(cfg, dtype or ref.dtype, device or ref.device, max_seq_len)
        inner = model.model
        cast = lambda t: t.detach().to(device=dec.device, dtype=dec.dtype)  # noqa: E731
        dec.embed.copy_(cast(inner.embed_tokens.weight))
        dec.norm.copy_(cast(inner.norm.weight))
        if not cfg.tie_embeddings:
            dec.lm_head.copy_(cast(model.lm_head.weight))
        for blk, layer, sites in zip(dec.layers, inner.layers, model_sites(model)):
            def rows(s):
                site = sites[s]
                return site.linear.weight[site.rows]
            blk.qkv.copy_(cast(torch.cat([rows("q"), rows("k"), rows("v")])))
            blk.o.copy_(cast(rows("o")))
            blk.gate_up.copy_(cast(torch.cat([rows("gate"), rows("up")])))
            blk.down.copy_(cast(rows("down")))
            if blk.qkv_bias is not None:
                bias = [sites[s].linear.bias[sites[s].rows] if sites[s].linear.bias is not None
                        else torch.zeros(len(range(*sites[s].rows.indices(sites[s].linear.out_features))),
                                         device=ref.device, dtype=ref.dtype) for s in "qkv"]
                blk.qkv_bias.copy_(cast(torch.cat(bias)))
            blk.attn_norm.copy_(cast(layer.input_layernorm.weight))
            blk.mlp_norm.copy_(cast(layer.post_attention_layernorm.weight))
        # RoPE: take HF's own frequencies (any rope type: llama3, yarn, ... are baked into them).
        rot = getattr(inner, "rotary_emb", None)
        if rot is not None and getattr(rot, "inv_freq", None) is not None:
            dec.inv_freq.copy_(rot.inv_freq.detach().float().to(dec.device))
            dec.rope_scaling = float(getattr(rot, "attention_scaling", 1.0))
        dec.set_rope()
        return dec

    def set_rope(self) -> None:
        pos = torch.arange(self.max_seq_len, device=self.device, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        # fp32 tables, cast to the model dtype as HF does (so the dense decoder matches it).
        self.register_buffer("cos", (emb.cos() * self.rope_scaling).to(self.dtype), persistent=False)
        self.register_buffer("sin", (emb.sin() * self.rope_scaling).to(self.dtype), persistent=False)

    def setup_cache(self, max_seq_len: int, batch: int = 1) -> None:
        cfg = self.cfg
        self.max_seq_len, self.batch = max_seq_len, batch
        # One buffer per layer and per K/V, written in place at each step. (A single [L, ...]
        # buffer indexed per layer made inductor copy the whole cache at every layer: a write
        # into a view of a buffer is functionalized into a copy of its base.)
        shape = (batch, cfg.n_kv_heads, max_seq_len, cfg.head_dim)
        for blk in self.layers:
            blk.register_buffer("k_cache", torch.zeros(shape, dtype=self.dtype, device=self.device), persistent=False)
            blk.register_buffer("v_cache", torch.zeros(shape, dtype=self.dtype, device=self.device), persistent=False)
        if hasattr(self, "cos") and self.cos.shape[0] < max_seq_len:
            self.set_rope()
        self._compiled = None

    # ------------------------------------------------------------------ sparsity

    def set_sparsity(self, thresholds=None, backend: str | None = None, prefill: str | None = None) -> None:
        """Thresholds [L, 7] (a ThresholdTable, tensor or None for dense), backend, prefill protocol.

        Changing thresholds only rewrites a buffer: a compiled step keeps its CUDA graph.
        """
        if backend is not None:
            if backend not in BACKENDS:
                raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
            if backend == "triton":
                self.prepare_triton()
            self.backend = backend
        if prefill is not None:
            self.prefill = check_prefill(prefill)
        if thresholds is None:
            self.thresholds.fill_(-1.0)
            return
        values = thresholds if torch.is_tensor(thresholds) else getattr(thresholds, "values", thresholds)
        values = torch.as_tensor(values, dtype=torch.float32)
        if values.shape != self.thresholds.shape:
            raise ValueError(f"thresholds must be [{self.cfg.n_layers}, {len(SITES)}] (layers x {SITES}), "
                             f"got {tuple(values.shape)}")
        if values.isnan().any():
            raise ValueError("thresholds contain NaN")
        self.thresholds.copy_(values)

    def prepare_triton(self) -> None:
        """The kernels' weight layout, made once, outside the decode step."""
        from .kernels import prepare_weight

        for blk in self.layers:
            if not blk.prepared:
                for p in PROJ_SITES:
                    setattr(blk, f"{p}_t", prepare_weight(getattr(blk, p)))

    def drop_triton(self) -> None:
        self.dense_wt, self.dense_triton = set(), set()  # both read the kernels' layout
        for blk in self.layers:
            for p in PROJ_SITES:
                setattr(blk, f"{p}_t", None)

    def reset_stats(self) -> None:
        self.stats.zero_()

    def realized(self) -> torch.Tensor:
        """Realized sparsity [L, 7] over the entries sparsified while `count` was on (NaN: none)."""
        z, n = self.stats[..., 0].cpu(), self.stats[..., 1].cpu()
        return torch.where(n > 0, z / n.clamp_min(1), torch.full_like(n, math.nan)).float()

    # ------------------------------------------------------------------ the model

    def _linear(self, x: torch.Tensor, li: int, proj: str, sparse_rows: slice | None,
                glu: bool = False) -> torch.Tensor:
        """One (fused) projection. `sparse_rows`: which token rows are sparse (None: all dense).
        glu: x is the gate/up output [gate | up] and the projection's input is silu(gate) * up;
        the Triton kernel computes it as it reads x (one launch less per layer), every other
        path first."""
        blk = self.layers[li]
        dense = sparse_rows is None or self.backend == "dense"
        kernel = x.shape[1] == 1 and (proj in self.dense_triton if dense else
                                      self.backend == "triton" and sparse_rows == slice(None))
        fused_glu = (glu and kernel and self.record is None
                     and not (self.count and not torch.compiler.is_compiling()))
        if glu and not fused_glu:
            gate, up = x.chunk(2, dim=-1)
            x = F.silu(gate) * up
        w = getattr(blk, proj)
        bias = blk.qkv_bias if proj == "qkv" else None
        if self.record is not None and sparse_rows is not None:
            self.record.setdefault((li, PROJ_STATE[proj]), []).append(x[:, sparse_rows].detach().float().flatten(0, -2))
        if dense and not kernel:
            wt = getattr(blk, f"{proj}_t") if proj in self.dense_wt else None
            if wt is not None:
                y = torch.matmul(x, wt)
                return y if bias is None else y + bias
            return F.linear(x, w, bias)
        t = self._proj_thresholds(li, proj, dense)
        if self.count and not dense and not torch.compiler.is_compiling():
            self._count_zeros(x[:, sparse_rows], li, proj, t)
        if kernel:
            from .kernels import sparse_gemv

            splits = self._splits(proj)
            return sparse_gemv(x, getattr(blk, f"{proj}_t"), t, splits=splits, bias=bias, glu=fused_glu)
        # torch backend (and sparse prefill rows of any backend): mask per output segment.
        outs = []
        start = 0
        for j, n in enumerate(self._splits(proj) or [w.shape[0]]):
            xm = x
            if sparse_rows == slice(None):
                xm = _sparse_mask(x, t[j])
            else:
                xm = x.clone()
                xm[:, sparse_rows] = _sparse_mask(x[:, sparse_rows], t[j])
            outs.append(F.linear(xm, w[start:start + n], None if bias is None else bias[start:start + n]))
            start += n
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def _count_zeros(self, x: torch.Tensor, li: int, proj: str, t: torch.Tensor) -> None:
        """Add the entries of x (a projection's input) at or under each segment's threshold to
        self.stats (eager runs with `count` on)."""
        cols = PROJ_SITES[proj]
        xs = x.float().abs().reshape(-1, 1)
        st = self.stats[li, cols[0]:cols[-1] + 1]  # a view: the counts land in self.stats
        st[:, 0] += (xs <= t[None, :]).sum(0)
        st[:, 1] += xs.numel()

    def _proj_thresholds(self, li: int, proj: str, dense: bool) -> torch.Tensor:
        """The thresholds of `proj`'s output segments in layer li: its sites' (sparse) or the
        keep-everything ones (dense through the kernel)."""
        cols = PROJ_SITES[proj]
        return self.keep_thresholds(proj) if dense else self.thresholds[li, cols[0]:cols[-1] + 1]

    def keep_thresholds(self, proj: str) -> torch.Tensor:
        """One negative threshold per output segment of `proj`: the kernel keeps every channel."""
        return self.keep_all[:len(self._splits(proj) or [0])]

    def _splits(self, proj: str):
        c = self.cfg
        return {"qkv": [c.q_size, c.kv_size, c.kv_size], "gate_up": [c.intermediate, c.intermediate]}.get(proj)

    def _attention(self, li: int, x: torch.Tensor, input_pos: torch.Tensor, sparse_rows) -> torch.Tensor:
        cfg = self.cfg
        b, t, _ = x.shape
        qkv = self._linear(x, li, "qkv", sparse_rows)
        if t == 1 and b == 1 and self._fused_attention():
            from .decode_attention import decode_attention

            blk = self.layers[li]
            y = decode_attention(qkv, self.cos, self.sin, input_pos, blk.k_cache, blk.v_cache, cfg.n_heads,
                                 1.0 / math.sqrt(cfg.head_dim))
            return self._linear(y, li, "o", sparse_rows)
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.view(b, t, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        k = k.view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        v = v.view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        cos, sin = self.cos[input_pos], self.sin[input_pos]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        kc, vc = self.layers[li].k_cache, self.layers[li].v_cache
        kc[:, :, input_pos] = k
        vc[:, :, input_pos] = v
        # Grouped-query attention without copying the cache per query head: the g = n_heads /
        # n_kv_heads query heads of a group become g * t rows against that group's keys.
        g = cfg.n_heads // cfg.n_kv_heads
        qg = q.reshape(b, cfg.n_kv_heads, g * t, cfg.head_dim)
        scores = torch.matmul(qg, kc.transpose(-1, -2)).float() * (1.0 / math.sqrt(cfg.head_dim))
        keep = torch.arange(self.max_seq_len, device=x.device)[None, :] <= input_pos[:, None]  # [t, S]
        scores = scores.masked_fill(~keep.repeat(g, 1), float("-inf"))
        p = torch.softmax(scores, dim=-1).to(x.dtype)
        y = torch.matmul(p, vc).view(b, cfg.n_heads, t, cfg.head_dim).transpose(1, 2).reshape(b, t, cfg.q_size)
        return self._linear(y, li, "o", sparse_rows)

    def _fused_attention(self) -> bool:
        if self.attention == "torch" or (self.attention == "auto" and self.device.type != "cuda"):
            return False
        from .decode_attention import usable

        ok = usable(self.device) and self.cfg.head_dim & (self.cfg.head_dim - 1) == 0
        if self.attention == "fused" and not ok:
            raise RuntimeError("fused attention needs Triton on a GPU (or TRITON_INTERPRET=1) and a "
                               "power-of-two head_dim")
        return ok

    def _sparse_rows(self, t: int) -> slice | None:
        if t == 1 or self.prefill == "all":
            return slice(None)
        if self.prefill == "last_half":
            return slice(t // 2, None)
        return None

    def uses_fused_step(self, tokens: torch.Tensor) -> bool:
        """Whether a step on `tokens` runs _forward_fused: one token, batch 1, every projection
        through the kernels, the fused attention kernel, and no inputs to record (calibration
        records them on the unfused step; counting works on both)."""
        if not self.fused_step or tuple(tokens.shape) != (1, 1) or self.record is not None:
            return False
        kernels = self.backend == "triton" or (self.backend == "dense" and self.dense_triton >= set(PROJ_SITES))
        return kernels and self.layers[0].prepared and self._fused_attention()

    def _forward_fused(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """One token (see uses_fused_step), logits [1, V]. The residual stream r is fp32; qkv and
        gate/up add into zeroed fp32 buffers: o clears qkv's once attention has read it, the next
        layer's qkv clears gate/up's once down has read it, so nothing is zeroed by a launch of
        its own (two fills per step, for the first layer). Attention leaves its split partials and
        o's kernel combines them as it reads its input (no combining tail in the attention kernel),
        unless the cache needs more splits than that unrolls (partials_config)."""
        from .decode_attention import decode_attention, decode_attention_partials, partials_config
        from .kernels import attention_input, glu_input, sparse_gemv_into

        cfg = self.cfg
        dense = self.backend == "dense"
        # Realized sparsity on this step: the kernels never materialize their inputs, so an eager
        # counting run computes them beside (their torch twins: norm_input, glu_input).
        count = self.count and not dense and not torch.compiler.is_compiling()

        def thr(li, proj, x):
            t = self._proj_thresholds(li, proj, dense)
            if count:
                self._count_zeros(x(), li, proj, t)
            return t

        r = F.embedding(tokens, self.embed).float().view(1, cfg.hidden)
        qkv = torch.zeros(1, cfg.proj_shape("qkv")[0], device=r.device)
        gu = torch.zeros(1, 2 * cfg.intermediate, device=r.device)
        eps = cfg.norm_eps
        scale = 1.0 / math.sqrt(cfg.head_dim)
        split = partials_config(cfg.head_dim, self.layers[0].k_cache.shape[2])
        for li, blk in enumerate(self.layers):
            sparse_gemv_into(qkv, r, blk.qkv_t, thr(li, "qkv", lambda: norm_input(r, blk.attn_norm, eps)),
                             self._splits("qkv"), blk.qkv_bias, norm_weight=blk.attn_norm, eps=eps, clear=gu)
            args = (qkv.view(1, 1, -1), self.cos, self.sin, input_pos, blk.k_cache, blk.v_cache, cfg.n_heads, scale)
            if split:
                part = decode_attention_partials(*args, *split)
                sparse_gemv_into(r, part, blk.o_t, thr(li, "o", lambda: attention_input(part, self.dtype)),
                                 clear=qkv, partials=True)
            else:
                y = decode_attention(*args).view(1, -1)
                sparse_gemv_into(r, y, blk.o_t, thr(li, "o", lambda: y), clear=qkv)
            sparse_gemv_into(gu, r, blk.gate_up_t, thr(li, "gate_up", lambda: norm_input(r, blk.mlp_norm, eps)),
                             self._splits("gate_up"), norm_weight=blk.mlp_norm, eps=eps)
            sparse_gemv_into(r, gu, blk.down_t, thr(li, "down", lambda: glu_input(gu, self.dtype)), glu=True)
        return F.linear(norm_input(r, self.norm, cfg.norm_eps), self.lm_head)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Logits of the last position [B, V] (or of every position [B, T, V]) for tokens [B, T]
        at positions input_pos [T]; writes their keys and values into the cache."""
        cfg = self.cfg
        if self.uses_fused_step(tokens):
            logits = self._forward_fused(tokens, input_pos)
            return logits.view(1, 1, -1) if all_logits else logits
        sparse_rows = self._sparse_rows(tokens.shape[1])
        h = F.embedding(tokens, self.embed)
        for li, blk in enumerate(self.layers):
            h = h + self._attention(li, rms_norm(h, blk.attn_norm, cfg.norm_eps), input_pos, sparse_rows)
            gu = self._linear(rms_norm(h, blk.mlp_norm, cfg.norm_eps), li, "gate_up", sparse_rows)
            h = h + self._linear(gu, li, "down", sparse_rows, glu=True)
        if not all_logits:
            h = h[:, -1]
        return F.linear(rms_norm(h, self.norm, cfg.norm_eps), self.lm_head)

    # ------------------------------------------------------------------ generation

    def _step(self, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """One decode step: next greedy token [B, 1] for token [B, 1] at input_pos [1]."""
        return self.greedy(self.forward(token, input_pos))

    def greedy(self, logits: torch.Tensor) -> torch.Tensor:
        """argmax [..., 1] of logits [..., V] (the first maximum, as torch.argmax), in two steps:
        the maximum of each chunk of `argmax_chunk` logits, then the first chunk holding the
        largest (ties go to the lower chunk, and within it to the lower index)."""
        c = self.argmax_chunk
        v = logits.shape[-1]
        if not c or v % c:
            return torch.argmax(logits, dim=-1, keepdim=True)
        vals, idx = logits.view(*logits.shape[:-1], v // c, c).max(dim=-1)
        j = vals.argmax(dim=-1, keepdim=True)
        return j * c + idx.gather(-1, j)

    def compile(self, mode: str | None = "reduce-overhead") -> None:
        """Compile the decode step (on a GPU: one CUDA graph per step). mode=None: eager."""
        self._compiled = None if mode is None else torch.compile(self._step, mode=mode, fullgraph=True)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, stream=None, eos_token_id=None,
                 sync: bool = True, forced: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Greedy generation. prompt [B, T] (or [T]) token ids -> (ids [B, T + new], timings).

        `stream(token_ids [B])` is called for each new token. Timings: prefill seconds, decode
        seconds (steps after the first new token) and decode tokens/s.
        `forced` [B, >= T + new - 1]: teacher forcing. Each step still computes its greedy token
        (returned in ids) but the next step is fed forced[:, position] instead, so that every run
        decodes the same sequence whatever the sparsity (benchmarks and calibration use this:
        sparsifying changes a greedy trajectory, and with it the distributions to calibrate).
        """
        if prompt.dim() == 1:
            prompt = prompt[None]
        prompt = prompt.to(self.device)
        b, t = prompt.shape
        if forced is not None:
            forced = forced.to(self.device)
            if forced.shape[1] < t + max_new_tokens - 1:
                raise ValueError(f"forced tokens: need {t + max_new_tokens - 1}, got {forced.shape[1]}")
        if b != self.batch:
            self.setup_cache(self.max_seq_len, b)
        if t + max_new_tokens > self.max_seq_len:
            raise ValueError(f"prompt ({t}) + new tokens ({max_new_tokens}) exceed the cache "
                             f"({self.max_seq_len}): build the decoder with a larger max_seq_len")
        cuda = self.device.type == "cuda"
        step = self._compiled or self._step
        out = torch.empty(b, t + max_new_tokens, dtype=torch.long, device=self.device)
        out[:, :t] = prompt
        t0 = time.perf_counter()
        logits = self.forward(prompt, torch.arange(t, device=self.device))
        tok = torch.argmax(logits, dim=-1, keepdim=True)
        out[:, t:t + 1] = tok
        if cuda and sync:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        if stream is not None:
            stream(tok[:, 0])
        n = 1
        done = eos_token_id is not None and bool((tok == eos_token_id).all())
        pos = torch.tensor([t], device=self.device)
        while n < max_new_tokens and not done:
            if self._compiled is not None and cuda:
                torch.compiler.cudagraph_mark_step_begin()
            fed = forced[:, t + n - 1:t + n] if forced is not None else tok
            tok = step(fed.clone() if self._compiled is not None else fed, pos)
            out[:, t + n:t + n + 1] = tok
            n += 1
            pos += 1
            if stream is not None:
                stream(tok[:, 0])
            if eos_token_id is not None and bool((tok == eos_token_id).all()):
                done = True
        if cuda and sync:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        timing = {"prefill_s": t1 - t0, "decode_s": t2 - t1, "new_tokens": n,
                  "decode_tok_s": (n - 1) / (t2 - t1) if n > 1 else math.nan,
                  "tok_s": n / (t2 - t0)}
        return out[:, :t + n], timing


# ---------------------------------------------------------------- bytes and ceilings

def weight_bytes_per_token(cfg: DecoderConfig, dtype, sparsity=None) -> dict:
    """Weight bytes one decode step reads: block projections (minus skipped columns) and lm_head.

    `sparsity`: None (dense), a scalar, or per-(layer, site) [L, 7]: the fraction of each site's
    input entries that are zero, hence of its weight columns that are not read.
    """
    es = torch.finfo(_dtype(dtype)).bits // 8
    params = torch.tensor([cfg.site_params()[s] for s in SITES], dtype=torch.float64)
    if sparsity is None:
        sparsity = 0.0
    p = torch.as_tensor(sparsity, dtype=torch.float64).expand(cfg.n_layers, len(SITES))
    blocks = float(((1 - p) * params).sum()) * es
    head = cfg.vocab * cfg.hidden * es
    return {"blocks": blocks, "lm_head": head, "total": blocks + head,
            "dense_total": float(params.sum()) * cfg.n_layers * es + head}


def amdahl_ceiling(cfg: DecoderConfig, dtype, sparsity) -> float:
    """Speedup bound of skipping weight reads alone: dense bytes / sparse bytes (lm_head dense)."""
    b = weight_bytes_per_token(cfg, dtype, sparsity)
    return b["dense_total"] / b["total"]


__all__ = ["Decoder", "DecoderConfig", "BACKENDS", "weight_bytes_per_token", "amdahl_ceiling", "rms_norm"]
