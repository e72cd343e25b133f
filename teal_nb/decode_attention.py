"""One-token attention step in one launch: RoPE of q and k, the KV-cache write, GQA attention.

In the compiled decode step, attention over the static cache was five small kernels per layer
(RoPE + cache write, Q K^T on cuBLAS, mask + softmax, P V on cuBLAS, and the scores' cast), each
a few microseconds of mostly launch latency and tail: about a tenth of a Llama-3-8B token. This
kernel does the whole step for one new token:

    q, k = rope(q, pos), rope(k, pos)            (fp32, rounded to the model dtype as stored)
    k_cache[:, h, pos], v_cache[:, h, pos] = k, v
    y[j] = softmax(q_j . K_h[:pos+1] / sqrt(D)) V_h[:pos+1]      j a query head, h = j // G

One program per query head (GQA: the G heads of a group read the same K/V rows, from L2 after
the first). The step is latency-bound (about 1 MB of cache per layer): the first BLOCK_S rows of
K and V are requested at once, unmasked, with the position and the new
q, k, v, so that the kernel waits for about two dependent loads (the position, then its RoPE
row); rows from the position on are masked out of the softmax, and longer contexts loop over
further blocks (masked loads) with an online softmax in fp32. The block size trades requests in
flight against registers (`CONFIGS`, chosen by timing on the device). The new position's key and value
come from registers, so no program reads what another one writes (the first head of each group
writes the cache, nobody waits). A first version (BLOCK_S = 64, every block loaded in the loop
after the position was known) took 9 us per layer on an H200 at position 100.
Scores and probabilities stay fp32 (the torch path rounds them to the model dtype); the output
is rounded once. A reference in plain torch (`decode_attention_reference`) computes the same
function; `decode_attention` is a torch custom op that mutates the two caches in place, so that
torch.compile keeps it in the step's CUDA graph without copying the cache.

`decode_attention_partials` stops one step short, for the decoder's fused step: the split
kernel's per-split softmax partials, which o_proj's kernel combines as it reads them
(`sparse_gemv_into(partials=True)`), so that no arrival counter and no last program re-reading
the partials end the attention kernel (kernels/README.md, item 17).
"""
from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
    from .kernels.gemv import HAVE_PDL, _capability, _stamp, _stamps_fit

    if HAVE_PDL:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover
    triton = tl = None
    HAVE_TRITON = HAVE_PDL = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Programmatic dependent launch (Hopper and newer), as the sparse GEMV kernels use it: the kernel
# is scheduled while qkv's kernel finishes and requests its cached K/V rows before waiting for
# it, and lets o's kernel be scheduled in turn. False: a plain launch (for A/B timing).
PDL = True
# The split kernel requests only the cached rows below the position (which it reads before the
# wait, so the request waits for one load more). False: each program requests its whole block of
# rows at entry, as the first version did; at a short context most of those rows lie past the
# position, read from HBM while qkv's projection streams its weights (Llama-3-8B at position 100:
# 0.6 of 1 MB per layer with a 256-row cache, 3.8 of 4.2 MB with 1024 rows). On the H200: +0.2% tok/s
# at 50% with 256 rows, +0.5% with 1024 (decode_profile_kvpos*.json).
KV_UP_TO_POS = True
# kernels/decode_timeline.py's "stampkv": the stamp "q, k, v loaded" waits for the program's cached
# K and V rows as well (a sum over them), so that it marks when all of its inputs have arrived.
STAMP_KV = False
# kernels/decode_timeline.py: called by every launch of the split kernel in
# decode_attention_partials as STAMP_HOOK(programs, {"kind": "attention"}) -> an int64
# [programs, 12] table its programs write their timeline into (GPU only), or None.
STAMP_HOOK = None


def usable(device: torch.device) -> bool:
    """Whether the Triton kernel runs for tensors on `device` (a GPU, or the CPU interpreter)."""
    return HAVE_TRITON and (device.type == "cuda" or (INTERPRET and device.type == "cpu"))


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _new_token(qkv, cos, sin, p: int, k_cache, v_cache, n_heads: int):
    """The references' common part: the new token's k and v written into the caches at p, and
    (q [B, H, D], keys and values [B, H, p+1, D]) in fp32, q and k RoPE'd and rounded to the cache
    dtype as the kernel rounds them, each key/value head repeated for its group."""
    b, hkv, _, d = k_cache.shape
    q_size, kv_size = n_heads * d, hkv * d
    x = qkv.reshape(b, -1).float()
    c, s = cos[p].float(), sin[p].float()
    q = _rope(x[:, :q_size].view(b, n_heads, d), c, s).to(k_cache.dtype).float()
    k_cache[:, :, p] = _rope(x[:, q_size:q_size + kv_size].view(b, hkv, d), c, s).to(k_cache.dtype)
    v_cache[:, :, p] = x[:, q_size + kv_size:].view(b, hkv, d).to(v_cache.dtype)
    g = n_heads // hkv
    return (q, k_cache[:, :, :p + 1].float().repeat_interleave(g, dim=1),
            v_cache[:, :, :p + 1].float().repeat_interleave(g, dim=1))


def decode_attention_reference(qkv, cos, sin, pos, k_cache, v_cache, n_heads: int, scale: float):
    """Pure torch, the kernel's function (fp32 math, q/k rounded to the cache dtype): writes
    k_cache/v_cache [B, Hkv, S, D] at `pos` and returns y [B, 1, n_heads * D] in the cache's dtype
    (the model's: qkv may be an fp32 accumulator, sparse_gemv_into's)."""
    q, kk, vv = _new_token(qkv, cos, sin, int(pos.reshape(-1)[0]), k_cache, v_cache, n_heads)
    att = torch.softmax(torch.einsum("bhd,bhsd->bhs", q, kk) * scale, dim=-1)
    y = torch.einsum("bhs,bhsd->bhd", att, vv)
    return y.reshape(q.shape[0], 1, -1).to(k_cache.dtype)


if HAVE_TRITON:

    @triton.jit
    def _rope_at(cos_ptr, sin_ptr, pos_ptr, d, D: tl.constexpr):
        """The position and its RoPE row (cos, sin in fp32)."""
        pos = tl.load(pos_ptr)
        return pos, tl.load(cos_ptr + pos * D + d).to(tl.float32), tl.load(sin_ptr + pos * D + d).to(tl.float32)

    @triton.jit
    def _new_row(qkv_ptr, cos, sin, j, h, d, Q_SIZE: tl.constexpr,
                 KV_SIZE: tl.constexpr, D: tl.constexpr, dt: tl.constexpr):
        """Query head j and key/value head h of the new token, RoPE applied (cos, sin of the
        position): q in fp32 (rounded to dt first, as the eager model's q is), k and v in dt (the
        cache's dtype)."""
        HALF: tl.constexpr = D // 2
        lo = d < HALF
        rd = tl.where(lo, d + HALF, d - HALF)       # rotate_half: [-x2, x1]
        sgn = tl.where(lo, -1.0, 1.0)
        qb = qkv_ptr + j * D
        kb = qkv_ptr + Q_SIZE + h * D
        q0, q1 = tl.load(qb + d).to(tl.float32), tl.load(qb + rd).to(tl.float32)
        k0, k1 = tl.load(kb + d).to(tl.float32), tl.load(kb + rd).to(tl.float32)
        v = tl.load(qkv_ptr + Q_SIZE + KV_SIZE + h * D + d).to(dt)
        q = (q0 * cos + sgn * q1 * sin).to(dt).to(tl.float32)
        k = (k0 * cos + sgn * k1 * sin).to(dt)
        return q, k, v

    @triton.jit
    def _wait_for_qkv(PDL: tl.constexpr):
        """PDL: everything before this call may overlap the launch before (qkv's projection);
        wait for it to finish (its output, the new row's q, k, v, is read next), then let the next
        launch be scheduled. What is read before the call (the cached rows, the position, the RoPE
        tables) was written before that launch, which waited for it: our kernels, the only ones
        that let the next launch start early, never write it."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()

    @triton.jit
    def _decode_attention_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, kc_ptr, vc_ptr, y_ptr,
                                 stride_kh, stride_ks, stride_vh, stride_vs, scale,
                                 Q_SIZE: tl.constexpr, KV_SIZE: tl.constexpr, G: tl.constexpr,
                                 D: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr):
        j = tl.program_id(0)          # query head
        h = j // G                    # its key/value head
        d = tl.arange(0, D)
        s = tl.arange(0, BLOCK_S)
        k_base = kc_ptr + h * stride_kh + d[None, :]
        v_base = vc_ptr + h * stride_vh + d[None, :]
        # Latency, not bandwidth, is the cost here: issue the first BLOCK_S cached rows of K and V
        # at once, before the position is even known (rows 0 .. BLOCK_S-1 exist in the cache,
        # BLOCK_S <= its length; rows at or past pos are masked out below), together with the
        # position and this head's q, k, v.
        kt = tl.load(k_base + s[:, None] * stride_ks)
        vt = tl.load(v_base + s[:, None] * stride_vs)
        pos, cos, sin = _rope_at(cos_ptr, sin_ptr, pos_ptr, d, D)
        _wait_for_qkv(PDL)
        dt = y_ptr.dtype.element_ty
        q, k, v = _new_row(qkv_ptr, cos, sin, j, h, d, Q_SIZE, KV_SIZE, D, dt)
        if j % G == 0:  # one writer per key/value head; no program reads row pos of the cache
            tl.store(kc_ptr + h * stride_kh + pos * stride_ks + d, k)
            tl.store(vc_ptr + h * stride_vh + pos * stride_vs + d, v)
        # Online softmax in fp32: the new position (from registers), then the cached rows < pos.
        m = tl.sum(q * k.to(tl.float32), axis=0) * scale
        sm = s < pos
        sc = tl.where(sm, tl.sum(kt.to(tl.float32) * q[None, :], axis=1) * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, axis=0))
        p = tl.exp(sc - m_new)
        alpha = tl.exp(m - m_new)
        acc = v.to(tl.float32) * alpha + tl.sum(p[:, None] * tl.where(sm[:, None], vt.to(tl.float32), 0.0), axis=0)
        l_sum = alpha + tl.sum(p, axis=0)
        m = m_new
        for s0 in range(BLOCK_S, pos, BLOCK_S):  # longer contexts: BLOCK_S rows at a time
            ss = s0 + s
            sm = ss < pos
            kt = tl.load(k_base + ss[:, None] * stride_ks, mask=sm[:, None], other=0.0)
            vt = tl.load(v_base + ss[:, None] * stride_vs, mask=sm[:, None], other=0.0)
            sc = tl.where(sm, tl.sum(kt.to(tl.float32) * q[None, :], axis=1) * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(sc, axis=0))
            alpha = tl.exp(m - m_new)
            p = tl.exp(sc - m_new)
            acc = acc * alpha + tl.sum(p[:, None] * vt.to(tl.float32), axis=0)
            l_sum = l_sum * alpha + tl.sum(p, axis=0)
            m = m_new
        tl.store(y_ptr + j * D + d, (acc / l_sum).to(dt))

    @triton.jit
    def _combine(part_ptr, cnt_ptr, y_ptr, j, d, n_active, D: tl.constexpr, N_SPLIT: tl.constexpr,
                 dt: tl.constexpr):
        """Count this chunk's arrival on head j; the last of the n_active chunks combines them."""
        tl.debug_barrier()  # every thread's stores issued before the arrival is signalled
        arrived = tl.atomic_add(cnt_ptr + j, 1, sem="acq_rel")
        if arrived == n_active - 1:  # the last chunk of head j combines
            cs = tl.arange(0, N_SPLIT)
            act = cs < n_active
            rows = part_ptr + (j * N_SPLIT + cs) * (D + 2)
            ms = tl.load(rows + D, mask=act, other=float("-inf"), cache_modifier=".cg")
            ls = tl.load(rows + D + 1, mask=act, other=0.0, cache_modifier=".cg")
            accs = tl.load(rows[:, None] + d[None, :], mask=act[:, None], other=0.0, cache_modifier=".cg")
            mm = tl.max(ms, axis=0)
            w = tl.where(act, tl.exp(ms - mm), 0.0)
            y = tl.sum(accs * w[:, None], axis=0) / tl.sum(ls * w, axis=0)
            tl.store(y_ptr + j * D + d, y.to(dt))
            tl.atomic_xchg(cnt_ptr + j, 0, sem="relaxed")

    @triton.jit
    def _decode_attention_split_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, kc_ptr, vc_ptr, y_ptr,
                                       part_ptr, cnt_ptr, S_MAX,
                                       stride_kh, stride_ks, stride_vh, stride_vs, scale,
                                       Q_SIZE: tl.constexpr, KV_SIZE: tl.constexpr, G: tl.constexpr,
                                       D: tl.constexpr, BLOCK_S: tl.constexpr, N_SPLIT: tl.constexpr,
                                       PDL: tl.constexpr, COMBINE: tl.constexpr, UP_TO_POS: tl.constexpr = True,
                                       stamp_ptr=None, STAMPS: tl.constexpr = False,
                                       STAMP_KV: tl.constexpr = False):
        """Flash-decoding: program (j, c) attends query head j to cache rows c*BLOCK_S ..
        (c+1)*BLOCK_S - 1 (requested at once before the wait; UP_TO_POS: only those below the
        position, KV_UP_TO_POS), chunk 0 also to the new position; each active chunk stores
        (weighted values, max, sum) at part[j, c] and, with COMBINE, the last one to arrive on
        head j's counter combines them into y. One block of latency whatever the position.
        Without COMBINE the partials are the output (an inactive chunk stores an empty one: m =
        -inf, l = 0) and the next kernel combines them as it reads them
        (sparse_gemv_into(partials=True), o_proj's): no arrival, no combining tail.
        STAMPS (kernels/decode_timeline.py): the GPU's timer at entry, after the wait, with the new
        row's q, k, v loaded (STAMP_KV: and the cached rows), with the partial computed and at
        the end (gemv._stamp's slots 0-4; a split past the position leaves slots 2-3 unwritten)."""
        j = tl.program_id(0)
        c = tl.program_id(1)
        _stamp(stamp_ptr, 0, j, STAMPS)
        h = j // G
        d = tl.arange(0, D)
        s = c * BLOCK_S + tl.arange(0, BLOCK_S)
        if UP_TO_POS:
            pos, cos, sin = _rope_at(cos_ptr, sin_ptr, pos_ptr, d, D)
            rows = s < pos  # (pos < S_MAX) a split past the position requests nothing
        else:
            rows = s < S_MAX
        kt = tl.load(kc_ptr + h * stride_kh + s[:, None] * stride_ks + d[None, :], mask=rows[:, None], other=0.0)
        vt = tl.load(vc_ptr + h * stride_vh + s[:, None] * stride_vs + d[None, :], mask=rows[:, None], other=0.0)
        if not UP_TO_POS:
            pos, cos, sin = _rope_at(cos_ptr, sin_ptr, pos_ptr, d, D)
        _wait_for_qkv(PDL)
        _stamp(stamp_ptr, 1, pos, STAMPS)
        n_active = tl.maximum((pos + BLOCK_S - 1) // BLOCK_S, 1)  # chunks holding rows < pos (>= 1)
        dt = kc_ptr.dtype.element_ty
        pb = part_ptr + (j * N_SPLIT + c) * (D + 2)
        if c < n_active:
            q, k, v = _new_row(qkv_ptr, cos, sin, j, h, d, Q_SIZE, KV_SIZE, D, dt)
            loaded = tl.sum(q, axis=0) + tl.sum(v.to(tl.float32), axis=0)
            if STAMPS and STAMP_KV:
                loaded += tl.sum(tl.sum(kt.to(tl.float32) + vt.to(tl.float32), axis=1), axis=0)
            _stamp(stamp_ptr, 2, loaded, STAMPS)
            if (j % G == 0) & (c == 0):
                tl.store(kc_ptr + h * stride_kh + pos * stride_ks + d, k)
                tl.store(vc_ptr + h * stride_vh + pos * stride_vs + d, v)
            s_new = tl.sum(q * k.to(tl.float32), axis=0) * scale
            first = c == 0
            sm = s < pos
            sc = tl.where(sm, tl.sum(kt.to(tl.float32) * q[None, :], axis=1) * scale, float("-inf"))
            m = tl.maximum(tl.where(first, s_new, float("-inf")), tl.max(sc, axis=0))
            p = tl.exp(sc - m)
            a_new = tl.where(first, tl.exp(s_new - m), 0.0)
            acc = v.to(tl.float32) * a_new + tl.sum(p[:, None] * tl.where(sm[:, None], vt.to(tl.float32), 0.0), axis=0)
            l_sum = a_new + tl.sum(p, axis=0)
            _stamp(stamp_ptr, 3, l_sum + tl.sum(acc, axis=0), STAMPS)
            # This chunk's partial: [acc[D], m, l] at part[j, c].
            tl.store(pb + d, acc)
            tl.store(pb + D, m)
            tl.store(pb + D + 1, l_sum)
            if COMBINE:
                _combine(part_ptr, cnt_ptr, y_ptr, j, d, n_active, D, N_SPLIT, dt)
        elif not COMBINE:
            tl.store(pb + d, tl.zeros([D], tl.float32))
            tl.store(pb + D, float("-inf"))
            tl.store(pb + D + 1, 0.0)
        _stamp(stamp_ptr, 4, j, STAMPS)


# (BLOCK_S, num_warps) per (head_dim, cache length), set by measurement (decode_bench times the
# candidates on the device at the start of a run); otherwise 64 x 4, which ptxas compiles for
# head_dim 128 without spills. Wider blocks request more of the cache at once but hold it in
# registers: 256 x 16 spilled 7 KB per thread (ptxas -v, sm_90a), 128 x 8 and 256 x 8 less.
# A third entry 1 selects the split (flash-decoding) kernel: one program per (head, BLOCK_S rows).
# After its wait a split program is a chain of dependent steps, not a stream: on the H200 at 64 x 4
# it spends ~4000 cycles (2 us) from the new row loaded to its partial (decode_timeline_cycles.json),
# for ~1000 instructions and 15 barriers (reductions across warps). On one or two warps they stay
# within a warp (16 x 1 has no barrier), but in the decode step those lost: 393.1 tok/s at 50% with
# 64 x 4, 392.2 with 32 x 2, 390.8 with 16 x 2, 389.8 with 16 x 1 (decode_profile_attn_warps.json),
# so they are not candidates: the bench chooses by the kernel's time alone.
CONFIGS: dict[tuple[int, int], tuple[int, ...]] = {}
CANDIDATES = ((64, 4), (64, 8), (128, 8), (16, 4, 1), (32, 4, 1), (64, 4, 1))


def launch_config(head_dim: int, s_max: int) -> tuple[int, int, int]:
    """(BLOCK_S, num_warps, split): the first block is loaded unmasked, so BLOCK_S <= the cache
    length; split = 1 selects the flash-decoding kernel."""
    block_s, warps, split = (tuple(CONFIGS.get((head_dim, s_max), (64, 4))) + (0,))[:3]
    return _fit_block_s(block_s, s_max), warps, split


def _fit_block_s(block_s: int, s_max: int) -> int:
    """BLOCK_S capped at the largest power of two within the cache length."""
    return min(block_s, 1 << (s_max.bit_length() - 1))


# Split kernel scratch per device: partials and per-head arrival counters (left zeroed by the
# kernel). Allocated outside any CUDA graph capture (the first call is never captured: a
# compiled step's first run is eager, and the bench warms up before it captures).
_SCRATCH: dict = {}


def _split_scratch(device: torch.device, n_part: int, n_heads: int):
    key = (device.type, device.index)
    part, cnt = _SCRATCH.get(key, (None, None))
    if part is None or part.numel() < n_part or cnt.numel() < n_heads:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("decode_attention: split scratch must be allocated before graph capture")
        part = torch.empty(max(n_part, 1 << 16), dtype=torch.float32, device=device)
        cnt = torch.zeros(max(n_heads, 256), dtype=torch.int32, device=device)
        _SCRATCH[key] = (part, cnt)
    return part, cnt


def _launch_options(qkv: torch.Tensor, warps: int) -> dict:
    """Warps, and PDL where the GPU has it (compute capability 9+) and PDL is on."""
    pdl = PDL and HAVE_PDL and qkv.is_cuda and _capability(qkv.device) >= 9
    return dict(PDL=pdl, num_warps=warps, **({"launch_pdl": True} if pdl else {}))


def _impl(qkv, cos, sin, pos, k_cache, v_cache, n_heads: int, scale: float) -> torch.Tensor:
    b, hkv, _, d = k_cache.shape
    if b != 1 or qkv.numel() != (n_heads + 2 * hkv) * d or not usable(qkv.device) or d & (d - 1):
        return decode_attention_reference(qkv, cos, sin, pos, k_cache, v_cache, n_heads, scale)
    y = torch.empty(1, 1, n_heads * d, dtype=k_cache.dtype, device=qkv.device)
    s_max = k_cache.shape[2]
    block_s, warps, split = launch_config(d, s_max)
    launch = _launch_options(qkv, warps)
    if split:
        n_split = triton.cdiv(s_max, block_s)
        n_split_p2 = triton.next_power_of_2(n_split)
        part, cnt = _split_scratch(qkv.device, n_heads * n_split_p2 * (d + 2), n_heads)
        _decode_attention_split_kernel[(n_heads, n_split)](
            qkv.reshape(-1), cos, sin, pos.reshape(-1), k_cache, v_cache, y, part, cnt, s_max,
            k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2), scale,
            Q_SIZE=n_heads * d, KV_SIZE=hkv * d, G=n_heads // hkv, D=d, BLOCK_S=block_s,
            N_SPLIT=n_split_p2, COMBINE=True, UP_TO_POS=KV_UP_TO_POS, **launch)
        return y
    _decode_attention_kernel[(n_heads,)](
        qkv.reshape(-1), cos, sin, pos.reshape(-1), k_cache, v_cache, y,
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2), scale,
        Q_SIZE=n_heads * d, KV_SIZE=hkv * d, G=n_heads // hkv, D=d, BLOCK_S=block_s, **launch)
    return y


@torch.library.custom_op("teal_nb::decode_attention", mutates_args=("k_cache", "v_cache"))
def decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, scale: float) -> torch.Tensor:
    """qkv [B, 1, (n_heads + 2 Hkv) D] (the fused projection's output, in the model's dtype or
    fp32), RoPE tables [S, D], pos [1] (int), caches [B, Hkv, S, D] written at pos -> attention
    output [B, 1, n_heads D] in the caches' dtype."""
    return _impl(qkv, cos, sin, pos, k_cache, v_cache, n_heads, scale)


@decode_attention.register_fake
def _(qkv, cos, sin, pos, k_cache, v_cache, n_heads, scale):
    return qkv.new_empty(k_cache.shape[0], 1, n_heads * k_cache.shape[-1], dtype=k_cache.dtype)


# The partials form (the combine done by the next kernel as it reads them) unrolls one load per
# split there: up to this many splits.
MAX_PARTIAL_SPLITS = 16


def partials_config(head_dim: int, s_max: int) -> tuple[int, int] | None:
    """(BLOCK_S, num_warps) of the split kernel for decode_attention_partials: the chosen config
    if it is a split one, else 64 x 4 (the split config chosen on the H200, decode.json); None if
    that needs more than MAX_PARTIAL_SPLITS splits (long caches keep decode_attention)."""
    block_s, warps, split = launch_config(head_dim, s_max)
    if not split:
        block_s, warps = _fit_block_s(64, s_max), 4
    return (block_s, warps) if -(-s_max // block_s) <= MAX_PARTIAL_SPLITS else None


def decode_attention_partials_reference(qkv, cos, sin, pos, k_cache, v_cache, n_heads: int, scale: float,
                                        block_s: int) -> torch.Tensor:
    """Pure torch, the split kernel's partials: writes the caches at `pos` as
    decode_attention_reference does and returns part [n_heads, S / block_s, D + 2] (fp32): for
    query head j and split c, over the cached rows c*block_s .. (c+1)*block_s - 1 below pos (and
    the new row, in split 0), the softmax-weighted values, the score maximum m and the weight
    sum l; a split with no rows is empty (0, -inf, 0). attention_input(part) is the attention."""
    b, _, s_max, d = k_cache.shape
    if b != 1:
        raise ValueError(f"decode_attention_partials_reference: batch 1 only, got {b}")
    p = int(pos.reshape(-1)[0])
    q, kk, vv = (t[0] for t in _new_token(qkv, cos, sin, p, k_cache, v_cache, n_heads))  # row p the new one
    sc = torch.einsum("hd,hsd->hs", q, kk) * scale
    n_split = -(-s_max // block_s)
    part = torch.zeros(n_heads, n_split, d + 2, device=qkv.device)
    part[:, :, d] = float("-inf")
    rows = torch.arange(p + 1, device=qkv.device)
    split_of = torch.where(rows == p, 0, rows // block_s)  # the new row is split 0's
    for ci in range(n_split):
        sel = split_of == ci
        if not bool(sel.any()):
            continue
        m = sc[:, sel].max(dim=1).values
        w = torch.exp(sc[:, sel] - m[:, None])
        part[:, ci, :d] = torch.einsum("hs,hsd->hd", w, vv[:, sel])
        part[:, ci, d] = m
        part[:, ci, d + 1] = w.sum(1)
    return part


@torch.library.custom_op("teal_nb::decode_attention_partials", mutates_args=("k_cache", "v_cache"))
def decode_attention_partials(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                              k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, scale: float,
                              block_s: int, warps: int) -> torch.Tensor:
    """decode_attention without its last step: the split kernel's partials [n_heads, S / block_s,
    D + 2] (fp32; see decode_attention_partials_reference), for sparse_gemv_into(partials=True)
    to combine as o_proj reads them. (block_s, warps) from partials_config; batch 1."""
    b, hkv, s_max, d = k_cache.shape
    if b != 1:
        raise ValueError(f"decode_attention_partials: batch 1 only (the fused decode step's), got a cache of "
                         f"batch {b}; decode_attention takes any batch")
    if qkv.numel() != (n_heads + 2 * hkv) * d or not usable(qkv.device) or d & (d - 1):
        return decode_attention_partials_reference(qkv, cos, sin, pos, k_cache, v_cache, n_heads, scale, block_s)
    n_split = triton.cdiv(s_max, block_s)
    part = torch.empty(n_heads, n_split, d + 2, dtype=torch.float32, device=qkv.device)
    stamps = None if STAMP_HOOK is None else STAMP_HOOK(n_heads * n_split, {"kind": "attention"})
    if stamps is not None and not _stamps_fit(stamps, n_heads * n_split):
        raise ValueError(f"stamps: {n_heads} x {n_split} programs write 12 int64 each: need an int64 tensor of at "
                         f"least [{n_heads * n_split}, 12], got {stamps.dtype} {tuple(stamps.shape)}")
    # y and the arrival counters are not used without COMBINE: part stands in for both pointers.
    _decode_attention_split_kernel[(n_heads, n_split)](
        qkv.reshape(-1), cos, sin, pos.reshape(-1), k_cache, v_cache, part, part, part, s_max,
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2), scale,
        Q_SIZE=n_heads * d, KV_SIZE=hkv * d, G=n_heads // hkv, D=d, BLOCK_S=block_s, N_SPLIT=n_split,
        COMBINE=False, UP_TO_POS=KV_UP_TO_POS, stamp_ptr=part if stamps is None else stamps,
        STAMPS=stamps is not None, STAMP_KV=STAMP_KV,
        **_launch_options(qkv, warps))
    return part


@decode_attention_partials.register_fake
def _(qkv, cos, sin, pos, k_cache, v_cache, n_heads, scale, block_s, warps):
    return qkv.new_empty(n_heads, -(-k_cache.shape[2] // block_s), k_cache.shape[-1] + 2, dtype=torch.float32)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


__all__ = ["decode_attention", "decode_attention_partials", "decode_attention_partials_reference",
           "decode_attention_reference", "partials_config", "usable"]
