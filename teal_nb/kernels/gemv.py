"""Fused threshold + input-sparse GEMV for one decode token, and its pure-torch reference.

y[n] = sum_k  x[k] * [|x[k]| > t(n)] * W[n, k]          (t(n): the threshold of n's segment)

At batch 1 a decoder projection is a matrix-vector product whose cost is reading W. If x[k] is
zeroed, column k of W is never needed. We store W transposed, `wt = W.T` with shape [K, N], so
that input channel k is one contiguous row of `wt`: skipping it skips whole 128-byte sectors.

Two kernels, one launch each, no zero-fill; `tuning.py` picks one per shape by measurement:

* Both: the grid is (N / BLOCK_N) x SPLIT_K; program (i, j) owns output columns
  i*BLOCK_N : (i+1)*BLOCK_N and one slice of the K input channels. Output blocks are wide
  (512-1024 columns, i.e. 1-2 KB of each kept row per program): on the H200 a program that reads
  only 32-128 B of each row streams 2-3x slower. The slices are sized so that the grid fills
  the SMs about evenly, since one program streams only ~16-20 GB/s (kernels/README.md).
* `_sparse_gemv_kernel` (masked): for each BLOCK_K tile of its slice it loads x, keeps the rows
  with |x| > t, and loads only those rows of the W^T tile (a masked-off row issues no memory
  transaction). Software-pipelined by hand: the next tile's W load is issued before the current
  tile's multiply-add, x two tiles ahead. Its trip count does not fall with sparsity.
* `_sparse_gemv_compact_kernel` (compacting): thresholds its slice (SLICE channels, up to all
  of K) and writes the kept channels' indices and values to a small scratch list with a prefix
  sum, then loops over kept rows only, BLOCK_K gathered rows at a time, DEPTH (1-2) tiles in
  flight, pipelined by hand in registers; the trip count falls with sparsity. SHARE programs
  may split one slice's kept channels evenly between them (a longer slice's count varies less
  than a short one's, and the busiest program ends the launch). Optionally the
  list is built once per launch by `_kept_list_kernel` (PRODUCER; measured slower) and either
  kernel can use programmatic dependent launch (PDL, chosen for every Llama-3-8B shape since
  sweep 8: kernels/README.md, item 11).
* Products are summed in fp32. In the compacting loop, when each thread holds whole columns of
  a tile, its rows are summed as they arrive into a [BLOCK_N] accumulator (SUM_ROWS: fewer
  registers, more programs per SM; bf16 and fp32 only, see _rows_per_thread).
* glu=True (down_proj): x is a fused gate/up output [gate | up] and the kernel's input is
  silu(gate) * up, computed as x is read (`glu_input` is its torch twin): no separate launch.
* The partial sums of the K slices of one output block are combined without a second launch:
  REDUCE=0 adds them with fp32 atomics into a scratch vector; REDUCE=1 stores them into a
  scratch matrix [SPLIT_K, N] (deterministic). Then each program increments the block's arrival
  counter; the program that arrives last reads the total (REDUCE=0: reads the sum and stores
  zeros, leaving the scratch clean; REDUCE=1: sums the slices in a fixed order), adds the bias,
  writes y in the output dtype and resets the counter. Scratch is allocated once per device and
  always left clean, so no zero-fill pass is needed and any output dtype works.
* sparse_gemv_into, the accumulating form (ACCUM): y is an fp32 vector that every program adds
  its partial sums to, with no counter and no last program (a decoder's fp32 residual stream,
  or a buffer that the launch before zeroed through `clear`); NORM computes the RMSNorm of a
  residual stream as x is read. The decoder's fused step runs on it (decode.py); its configs are
  tuning.ACCUM (kernels/README.md, item 13).
* Fused projections (QKV, gate/up) pass one threshold per output segment; a program's segment
  is the one its first output column falls in (segments are multiples of BLOCK_N, the wrapper
  shrinks BLOCK_N until they are, or launches per segment).

NaN and inf: the rule is TEAL's, keep x[k] iff |x[k]| > t. NaN compares false, so a NaN input is
dropped (treated as zero, it never reaches y); +-inf is kept unless t = inf and then gives +-inf
(or NaN when +inf and -inf meet) as the dense product would. A negative threshold keeps every
entry, NaN included: the kernel as a dense GEMV, which propagates NaN as cuBLAS does (a decoder
may pick it where it beats cuBLAS, decode_bench.choose_dense_layout). Kernel and reference follow
the same rule. A weight that is NaN/inf in a skipped row is never read by the kernel (the reference
multiplies it by 0 and gets NaN); weights are assumed finite.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional, Sequence

import torch

try:  # Triton is optional: without it everything runs through the reference.
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAVE_TRITON = False

# Triton's CPU interpreter must be chosen before the kernel is defined (i.e. at import).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# No gpu-scope fence in every thread before the split-K arrival counter (threadFenceReduction's
# pattern): the barrier before the one-thread acq_rel increment already orders the program's
# partial sums (a PTX release is cumulative over barrier-synchronized writes), and the fence cost
# ~2 us per layer (kernels/README.md, item 10). TEAL_GEMV_FENCE=1 puts it back.
GPU_FENCE = os.environ.get("TEAL_GEMV_FENCE", "0") == "1"
# NORM requests the slice's residual and norm weight before the norm's reduction (_compact), so
# their HBM round trip overlaps the reduction's barriers: ~0.2 us per norm launch, +0.3% tok/s
# (kernels/README.md, item 25). Kept as a switch for kernels/ab_gemv.py --flag NORM_PRELOAD.
NORM_PRELOAD = True
# sparse_gemv_into's programs ask L2 for their first W_PREFETCH_ROWS candidate rows of W^T before
# their PDL wait (_prefetch_w), so that the first tiles after the kept list come from L2. Measured
# per kind of input (kernels/README.md, item 26): o (partials) and down (glu) +1.2% tok/s at 50%
# together; the NORM launches (qkv, gate/up) lost 2% in the decode step, so they go without.
W_PREFETCH = True
W_PREFETCH_ROWS = 16  # 2 tiles of 8 rows; k|v's 2 tiles of 32 rows (half its rows) lost
W_PREFETCH_KINDS = {"plain", "glu", "partials"}  # sparse_gemv_into's inputs it applies to
# kernels/decode_timeline.py: called by every compacting launch without a stamp table as
# STAMP_HOOK(programs, {"N", "K", "kind"}) -> an int64 [programs, 12] table for it, or None.
STAMP_HOOK = None


def _splits(splits: Optional[Sequence[int]], n: int) -> tuple[int, ...]:
    splits = (n,) if splits is None else tuple(int(s) for s in splits)
    if sum(splits) != n or any(s <= 0 for s in splits):
        raise ValueError(f"splits {splits} must be positive and sum to N={n}")
    return splits


def _check(x: torch.Tensor, wt: torch.Tensor, thresholds: torch.Tensor, splits, glu: bool = False,
           partials: bool = False):
    if wt.dim() != 2:
        raise ValueError(f"wt must be [K, N] (from prepare_weight), got {tuple(wt.shape)}")
    K, N = wt.shape
    if partials:
        if x.dim() != 3 or x.dtype != torch.float32 or x.shape[0] * (x.shape[2] - 2) != K:
            raise ValueError(f"partials: x must be a split attention's fp32 partials [heads, splits, head_dim + 2] "
                             f"with heads x head_dim = K = {K} (decode_attention_partials), got {x.dtype} "
                             f"{tuple(x.shape)}")
    elif x.shape[-1] != (2 * K if glu else K):
        raise ValueError(f"x has {x.shape[-1]} features, wt expects K={K}"
                         + (f" (glu: [gate | up], 2K = {2 * K})" if glu else ""))
    splits = _splits(splits, N)
    if thresholds.numel() != len(splits):
        raise ValueError(f"{thresholds.numel()} thresholds for {len(splits)} segments")
    return K, N, splits


# ----------------------------------------------------------------------------- reference

def keep_mask(x: torch.Tensor, t) -> torch.Tensor:
    """The kernel's rule (its `_keep`): |x| > t, NaN dropped, except that a negative threshold
    keeps everything, NaN included (the dense product). x compared in fp32."""
    return (x.float().abs() > t) | (t < 0)


def glu_input(x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """silu(gate) * up for x = [gate | up] (a fused gate/up projection's output): the input of
    down_proj, computed in fp32 and rounded once to `dtype` (default x's; the kernel rounds to
    its weight's dtype, as inductor's fused kernel rounds to the model's)."""
    gate, up = x.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(dtype or x.dtype)


def norm_input(r: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of a residual stream r as HF Llama computes it (normalize in fp32, round to the
    model's dtype, scale by w in that dtype): the input of qkv and gate/up when the kernel fuses
    the norm (`norm_weight=`)."""
    rf = r.float()
    rf = rf * torch.rsqrt(rf.pow(2).mean(-1, keepdim=True) + eps)
    return w * rf.to(w.dtype)


def attention_input(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The attention output [1, H * D] from a split attention's partials [H, S, D + 2]
    (decode_attention_partials: per head and split the softmax-weighted values, then the split's
    score maximum m and weight sum l; an empty split has m = -inf, l = 0): combined in fp32 as
    sum_s w_s acc_s / sum_s w_s l_s with w_s = exp(m_s - max m), rounded once to `dtype`. The
    input that sparse_gemv_into(partials=True) computes as it reads x (o_proj's)."""
    part = part.float()
    acc, m, l = part[..., :-2], part[..., -2], part[..., -1]
    w = torch.exp(m - m.max(dim=1, keepdim=True).values)
    y = (acc * w[..., None]).sum(1) / (l * w).sum(1)[:, None]
    return y.reshape(1, -1).to(dtype)


def _reference_fp32(x, wt, thresholds, splits, bias):
    """The masked product in fp32, not rounded: y[n] = sum_k x[k] [|x[k]| > t(n)] wt[k, n]."""
    xf = x.float()
    thr = thresholds.detach().float().reshape(-1).to(x.device)
    outs, start = [], 0
    for i, n in enumerate(splits):
        xm = torch.where(keep_mask(xf, thr[i]), xf, torch.zeros((), device=x.device))
        outs.append(xm @ wt[:, start:start + n].float())
        start += n
    y = torch.cat(outs, dim=-1)
    return y if bias is None else y + bias.float()


def sparse_gemv_reference(x, wt, thresholds, splits=None, bias=None, glu=False):
    """Pure torch, fp32: mask x per segment (keep |x| > t), multiply by that segment's columns.
    glu: x is [gate | up] and the input is glu_input(x, wt.dtype)."""
    K, N, splits = _check(x, wt, thresholds, splits, glu)
    out_dtype = x.dtype
    if glu:
        x = glu_input(x, wt.dtype)
    return _reference_fp32(x, wt, thresholds, splits, bias).to(out_dtype)


def sparse_gemv_into_reference(out, x, wt, thresholds, splits=None, bias=None, glu=False,
                               norm_weight=None, eps=1e-5, clear=None, partials=False):
    """Pure-torch twin of sparse_gemv_into: out (fp32) += the masked product, not rounded; the
    input is glu_input(x, wt.dtype) (glu), norm_input(x, norm_weight, eps) (norm),
    attention_input(x, wt.dtype) (partials) or x; clear (if given) is zeroed."""
    K, N, splits = _check(x, wt, thresholds, splits, glu, partials)
    if partials:
        x = attention_input(x, wt.dtype)
    elif glu:
        x = glu_input(x, wt.dtype)
    elif norm_weight is not None:
        x = norm_input(x, norm_weight, eps)
    out += _reference_fp32(x, wt, thresholds, splits, bias).reshape(out.shape)
    if clear is not None:
        clear.zero_()


# ----------------------------------------------------------------------------- kernel

class Config(NamedTuple):
    """A launch configuration (`tuning.py` holds one per shape as a plain tuple of its first fields).

    slice = 0 selects the masked kernel, with about `progs_per_sm` programs per SM; slice > 0 the
    compacting kernel, each program owning `slice` input channels (slice >= K: one program per
    output block owns all of K, so no split-K reduction at all); `depth` (1 or 2) W tiles are in
    flight ahead of the multiply-add in its loop. `pdl` = 1 launches with Hopper's programmatic
    dependent launch (the next launch's programs are scheduled while this one finishes; Hopper
    and newer, ignored elsewhere): 2-12% faster per shape on the H200 (kernels/README.md, item 11).
    """
    block_n: int
    block_k: int
    warps: int = 4
    progs_per_sm: int = 0
    reduce: int = 0  # split-K reduction: 0 fp32 atomics, 1 one row per slice (deterministic)
    slice: int = 0
    depth: int = 1
    pdl: int = 0
    scan: int = 0  # compacting: channels per prefix-sum step (0: 8 per thread)
    producer: int = 0  # compacting: 1 = a small kernel builds the kept list once per launch
    maxnreg: int = 0  # ptxas's register cap per thread (0: none); 128 keeps 4 programs of 4 warps per SM
    sum_rows: int = -1  # compacting: 1-D accumulator; -1 the dtype's default (_rows_per_thread), 0 off, 1 on
    share: int = 1  # compacting: programs that split one slice's kept channels evenly (_sparse_gemv_compact_kernel)


if HAVE_TRITON:
    try:  # griddepcontrol (programmatic dependent launch), Hopper and newer
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
        from triton.backends.nvidia.compiler import CUDAOptions

        HAVE_PDL = "launch_pdl" in CUDAOptions.__dataclass_fields__
    except ImportError:  # pragma: no cover - older Triton
        HAVE_PDL = False

    @triton.jit
    def _prologue(thr_ptr, N, B1, B2, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
        """This program's output columns and its segment's threshold (fused QKV: 3 segments)."""
        if PDL:
            # Launched early, while the previous kernel on the stream finishes: wait for it (its
            # output may be our x; the scratch is shared) before touching memory, then let the
            # next launch be scheduled in turn.
            gdc_wait()
            gdc_launch_dependents()
        n0 = tl.program_id(0) * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        seg = (n0 >= B1).to(tl.int32) + (n0 >= B2).to(tl.int32)
        return offs_n, offs_n < N, seg, tl.load(thr_ptr + seg)

    @triton.jit
    def _stamp(stamp_ptr, slot, dep, STAMPS: tl.constexpr):
        """STAMPS (kernels/gemv_timeline.py): write the GPU's global timer (ns) and this SM's cycle
        counter into slots 2 * slot and 2 * slot + 1 of this program's row of stamp_ptr, once
        `dep` (a scalar) is computed; slot 0 also writes the SM's id into slot 10."""
        if STAMPS:
            row = stamp_ptr + (tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)) * 12
            t = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer; // $1", "=l,r", [dep.to(tl.int32)],
                                          dtype=tl.int64, is_pure=False, pack=1)
            c = tl.inline_asm_elementwise("mov.u64 $0, %clock64; // $1", "=l,r", [dep.to(tl.int32)],
                                          dtype=tl.int64, is_pure=False, pack=1)
            tl.store(row + 2 * slot, t)
            tl.store(row + 2 * slot + 1, c)
            if slot == 0:
                sm = tl.inline_asm_elementwise("mov.u32 $0, %smid; // $1", "=r,r", [dep.to(tl.int32)],
                                               dtype=tl.int32, is_pure=False, pack=1)
                tl.store(row + 10, sm.to(tl.int64))

    @triton.jit
    def _prefetch_w(wt_ptr, K, stride_wk, SLICE, ROW_BYTES, BLOCK_N: tl.constexpr, SHARE: tl.constexpr,
                    PF_ROWS: tl.constexpr, LANES: tl.constexpr):
        """Ask L2 for the first PF_ROWS rows of this program's part of its slice of W^T (each
        row of its block ROW_BYTES contiguous bytes: one cp.async.bulk.prefetch.L2 per row, one
        row per thread; Hopper and newer). W does not depend on x, so this may run before the
        wait for the launch before; the rows this program streams first are among these (all of
        them at s = 0, about half at 50%), so its first tiles come from L2 instead of HBM, and
        the bytes move while the launch before drains, when HBM is underused (its tail,
        kernels/README.md item 23). PF_ROWS = 0: nothing (the interpreter has no inline asm)."""
        if PF_ROWS > 0:
            k_lo = (tl.program_id(1) // SHARE) * SLICE
            k_hi = tl.minimum(k_lo + SLICE, K)
            first = k_lo + (tl.program_id(1) % SHARE) * (k_hi - k_lo) // SHARE
            r = tl.arange(0, LANES)
            ok = (r < PF_ROWS) & (first + r < k_hi)
            rows = wt_ptr + tl.program_id(0) * BLOCK_N + (first + r).to(tl.int64) * stride_wk
            tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.ne.b32 p, $1, 0; @p cp.async.bulk.prefetch.L2.global [$2], $3; mov.b32 $0, 0; }",
                "=r,r,l,r", [ok.to(tl.int32), rows, tl.zeros_like(r) + ROW_BYTES], dtype=tl.int32,
                is_pure=False, pack=1)

    @triton.jit
    def _keep(x, t):
        """TEAL's rule, |x| > t (NaN compares false: dropped), except that a negative threshold
        keeps everything, NaN included (the dense product)."""
        return (tl.abs(x) > t) | ((tl.zeros_like(x) + t) < 0)

    @triton.jit
    def _load_rows(w_base, rows, rmask, nmask, stride_wk, EVEN_N: tl.constexpr):
        """Rows `rows` of the W^T block (a masked-off row issues no memory transaction)."""
        if EVEN_N:
            return tl.load(w_base + rows[:, None] * stride_wk, mask=rmask[:, None], other=0.0)
        return tl.load(w_base + rows[:, None] * stride_wk, mask=rmask[:, None] & nmask[None, :],
                       other=0.0)

    @triton.jit
    def _fence_gpu(FENCE: tl.constexpr):
        """fence.acq_rel.gpu in every thread (CUDA's __threadfence); a no-op in the interpreter,
        which has no inline assembly and runs programs one after another anyway."""
        if FENCE:
            tl.inline_asm_elementwise("fence.acq_rel.gpu; // $0", "=r", [], dtype=tl.int32,
                                      is_pure=False, pack=1)

    @triton.jit
    def _epilogue(part, offs_n, nmask, bias_ptr, y_ptr, acc_ptr, cnt_ptr, N,
                  REDUCE: tl.constexpr, HAS_BIAS: tl.constexpr, FENCE: tl.constexpr,
                  ACCUM: tl.constexpr):
        """Write y = sum over K slices of `part` (+ bias) in y's dtype.

        ACCUM (sparse_gemv_into): y is an fp32 vector to add to; every program adds its partial
        sums with fp32 atomics and is done: no arrival counter, no last program re-reading the
        total (the serial tail of the split-K reduction below).
        One slice: store. Several: REDUCE=0 adds the partials with fp32 atomics into a scratch
        vector, REDUCE=1 stores them as one row per slice; then each program increments its
        output block's arrival counter, and the last to arrive reads the total (REDUCE=0: and
        zeroes the scratch again; REDUCE=1: sums the rows in a fixed order), adds the bias,
        writes y and resets the counter. The scratch is left clean: no zero-fill launch.
        """
        pid_n = tl.program_id(0)
        split_k = tl.num_programs(1)
        if ACCUM:
            if HAS_BIAS:
                if tl.program_id(1) == 0:
                    part += tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
            tl.atomic_add(y_ptr + offs_n, part, mask=nmask, sem="relaxed")
        elif split_k == 1:
            if HAS_BIAS:
                part += tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
            tl.store(y_ptr + offs_n, part, mask=nmask)  # cast to y's dtype on store
        else:
            if REDUCE == 0:
                tl.atomic_add(acc_ptr + offs_n, part, mask=nmask, sem="relaxed")
            else:
                tl.store(acc_ptr + tl.program_id(1) * N + offs_n, part, mask=nmask)
            # Every thread's partials reach L2 before the arrival is counted: a fence in each
            # thread (as in CUDA's threadFenceReduction), the barrier, one thread's increment.
            _fence_gpu(FENCE)
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
            if arrived == split_k - 1:  # the last program of this output block finishes it
                _fence_gpu(FENCE)  # the acquire, for every thread of this program
                if REDUCE == 0:
                    # All slices have added (acquired through the counter): read the sum from L2,
                    # then zero the scratch for the next call. The compiler may give the load and
                    # the zeroing store different thread layouts (it did for 1024 columns on 4
                    # warps), so one thread could zero what another had not yet read: the
                    # barrier keeps every read before any zeroing (without it: rel_err 0.04-0.24
                    # now and then on the H200).
                    total = tl.load(acc_ptr + offs_n, mask=nmask, other=0.0, cache_modifier=".cg")
                    tl.debug_barrier()
                    tl.store(acc_ptr + offs_n, tl.zeros([part.shape[0]], tl.float32), mask=nmask)
                else:
                    total = tl.zeros([part.shape[0]], tl.float32)
                    for j in range(0, split_k):
                        total += tl.load(acc_ptr + j * N + offs_n, mask=nmask, other=0.0,
                                         cache_modifier=".cg")
                if HAS_BIAS:
                    total += tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
                tl.store(y_ptr + offs_n, total, mask=nmask)
                tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed")

    @triton.jit
    def _sparse_gemv_kernel(
        x_ptr, wt_ptr, thr_ptr, bias_ptr, y_ptr, acc_ptr, cnt_ptr, nw_ptr, eps, clr_ptr, CLR_N,
        N, K, stride_wk, B1, B2, ITERS,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        REDUCE: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_N: tl.constexpr, PDL: tl.constexpr,
        FENCE: tl.constexpr, GLU: tl.constexpr, NORM: tl.constexpr, NORM_BLOCK: tl.constexpr,
        ACCUM: tl.constexpr, HAS_CLEAR: tl.constexpr, CLR_BLOCK: tl.constexpr,
        PARTS: tl.constexpr, HEAD_D: tl.constexpr,
    ):
        """Masked variant: walks its K slice tile by tile, loading only the kept rows of each."""
        offs_n, nmask, seg, t = _prologue(thr_ptr, N, B1, B2, BLOCK_N, PDL)
        _clear(clr_ptr, CLR_N, HAS_CLEAR, CLR_BLOCK)
        rs = _norm_scale(x_ptr, K, eps, NORM, NORM_BLOCK)
        # This program's K slice: ITERS tiles of BLOCK_K input channels.
        k0 = tl.program_id(1) * ITERS * BLOCK_K
        ar_k = tl.arange(0, BLOCK_K)
        w_base = wt_ptr + offs_n[None, :]

        # Software pipeline by hand (registers, works in the interpreter too): the x tile is
        # loaded two steps ahead and the W tile one step ahead of the multiply-add, so each
        # program keeps a W tile in flight while it multiplies the previous one.
        offs_k = k0 + ar_k
        x_cur = _load_x(x_ptr, offs_k, offs_k < K, K, nw_ptr, rs, GLU, NORM, PARTS, HEAD_D)
        # The fused threshold: keep channel k iff |x[k]| > t (NaN > t is False: dropped; t < 0:
        # every channel, NaN included).
        keep = _keep(x_cur, t) & (offs_k < K)
        x_cur = tl.where(keep, x_cur, 0.0)
        w_cur = _load_rows(w_base, offs_k, keep, nmask, stride_wk, EVEN_N)
        offs_k = k0 + BLOCK_K + ar_k
        x_nxt = _load_x(x_ptr, offs_k, (offs_k < K) & (ITERS > 1), K, nw_ptr, rs, GLU, NORM, PARTS, HEAD_D)
        acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        for i in range(1, ITERS):
            offs_k = k0 + i * BLOCK_K + ar_k
            keep = _keep(x_nxt, t) & (offs_k < K)
            x_nxt = tl.where(keep, x_nxt, 0.0)
            w_nxt = _load_rows(w_base, offs_k, keep, nmask, stride_wk, EVEN_N)
            offs_k2 = offs_k + BLOCK_K
            x_nn = _load_x(x_ptr, offs_k2, (offs_k2 < K) & (i + 1 < ITERS), K, nw_ptr, rs, GLU, NORM, PARTS, HEAD_D)
            acc += w_cur.to(tl.float32) * x_cur[:, None]
            x_cur = x_nxt
            w_cur = w_nxt
            x_nxt = x_nn
        acc += w_cur.to(tl.float32) * x_cur[:, None]
        part = tl.sum(acc, axis=0)  # [BLOCK_N] fp32 partial sums of this K slice
        _epilogue(part, offs_n, nmask, bias_ptr, y_ptr, acc_ptr, cnt_ptr, N, REDUCE, HAS_BIAS, FENCE,
                  ACCUM)

    @triton.jit
    def _load_x(x_ptr, offs, mask, K, nw_ptr, rs, GLU: tl.constexpr, NORM: tl.constexpr,
                PARTS: tl.constexpr, HEAD_D: tl.constexpr):
        """x[offs] in fp32, as the model computes its projection's input, in the weights' dtype
        (nw_ptr: the norm weight, or the projection's weight when there is no norm).
        GLU: x_ptr holds [gate | up] (2K values) and x = silu(gate) * up, computed in fp32 and
        rounded once, so that down_proj needs no separate SiLU x up kernel before it.
        NORM: x_ptr is the residual stream r and x = w * round(r * rs) (rs from _norm_scale),
        RMSNorm as HF Llama computes it, so that qkv and gate/up need no norm kernel before them."""
        if PARTS:
            # x_ptr: a split attention's partials [heads, PARTS, HEAD_D + 2] (per split: the
            # weighted values, then the running max m and sum l of its softmax), as
            # decode_attention_partials leaves them; x[k] is their combination for channel k
            # (head k // HEAD_D), rounded to the weights' dtype as the attention output is.
            # The PARTS rows are loaded at once (unrolled): one round trip.
            row = x_ptr + (offs // HEAD_D) * (PARTS * (HEAD_D + 2))
            d = offs % HEAD_D
            # (Lanes past K read m = 0, l = 1: finite, 0 / PARTS.)
            mm = tl.full(offs.shape, float("-inf"), tl.float32)
            for c in tl.static_range(PARTS):
                mm = tl.maximum(mm, tl.load(row + c * (HEAD_D + 2) + HEAD_D, mask=mask, other=0.0))
            num = tl.zeros(offs.shape, tl.float32)
            den = tl.zeros(offs.shape, tl.float32)
            for c in tl.static_range(PARTS):
                b = row + c * (HEAD_D + 2)
                w = tl.exp(tl.load(b + HEAD_D, mask=mask, other=0.0) - mm)
                num += w * tl.load(b + d, mask=mask, other=0.0)
                den += w * tl.load(b + HEAD_D + 1, mask=mask, other=1.0)
            return (num / den).to(nw_ptr.dtype.element_ty).to(tl.float32)
        if GLU:
            g = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(x_ptr + K + offs, mask=mask, other=0.0).to(tl.float32)
            return (g * tl.sigmoid(g) * u).to(nw_ptr.dtype.element_ty).to(tl.float32)
        if NORM:
            r, w = _norm_raw(x_ptr, offs, mask, nw_ptr)
            return _norm_finish(r, w, rs, nw_ptr)
        return tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _norm_raw(x_ptr, offs, mask, nw_ptr):
        """NORM's loads for x[offs]: the residual stream and the norm weight, in fp32."""
        r = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(nw_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        return r, w

    @triton.jit
    def _norm_finish(r, w, rs, nw_ptr):
        """x = w * round(r * rs), rounded to the norm weight's dtype, as HF Llama's RMSNorm."""
        xn = (r * rs).to(nw_ptr.dtype.element_ty).to(tl.float32)
        return (xn * w).to(nw_ptr.dtype.element_ty).to(tl.float32)

    @triton.jit
    def _norm_scale(x_ptr, K, eps, NORM: tl.constexpr, NORM_BLOCK: tl.constexpr):
        """1 / sqrt(mean(r^2) + eps) over all K entries of the residual stream r (NORM), which
        every program computes for itself: K reads from L2 instead of a norm launch."""
        rs = 1.0
        if NORM:
            ss = tl.zeros([NORM_BLOCK], dtype=tl.float32)
            for k in range(0, K, NORM_BLOCK):
                offs = k + tl.arange(0, NORM_BLOCK)
                r = tl.load(x_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)
                ss += r * r
            rs = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / K + eps)
        return rs

    @triton.jit
    def _clear(clr_ptr, CLR_N, HAS_CLEAR: tl.constexpr, CLR_BLOCK: tl.constexpr):
        """Zero this program's share of the clear vector (sparse_gemv_into's `clear`: the next
        launch's fp32 output, already consumed); called after the prologue's wait."""
        if HAS_CLEAR:
            p = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
            offs = p * CLR_BLOCK + tl.arange(0, CLR_BLOCK)
            tl.store(clr_ptr + offs, tl.zeros([CLR_BLOCK], dtype=tl.float32), mask=offs < CLR_N)

    @triton.jit
    def _compact(x_ptr, idx_ptr, xv_ptr, t, k_lo, k_hi, K, nw_ptr, eps, SCAN: tl.constexpr,
                 GLU: tl.constexpr, NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, PARTS: tl.constexpr,
                 HEAD_D: tl.constexpr, PRELOAD: tl.constexpr):
        """Write the kept channels of x[k_lo:k_hi] (|x| > t) and their values to idx_ptr / xv_ptr
        in order; return how many. A kept channel's position is the number of kept channels
        before it: a prefix sum, SCAN channels at a time (8 per thread keeps the registers low),
        the next SCAN channels of x loaded before the current ones are summed.
        NORM: the first SCAN channels' residual and norm weight are requested before the norm's
        sum over all of K, whose cross-warp reduction is a barrier that no load after it crosses:
        their round trip (the weight's from HBM: ~15 GB of weights pass through L2 between two
        uses) overlaps the sum's instead of following it."""
        count = k_lo * 0
        offs = k_lo + tl.arange(0, SCAN)
        if NORM and PRELOAD:
            r0, w0 = _norm_raw(x_ptr, offs, offs < k_hi, nw_ptr)
            rs = _norm_scale(x_ptr, K, eps, NORM, NORM_BLOCK)
            xs_next = _norm_finish(r0, w0, rs, nw_ptr)
        else:
            rs = _norm_scale(x_ptr, K, eps, NORM, NORM_BLOCK)
            xs_next = _load_x(x_ptr, offs, offs < k_hi, K, nw_ptr, rs, GLU, NORM, PARTS, HEAD_D)
        for c in range(k_lo, k_hi, SCAN):
            inb = offs < k_hi
            xs = xs_next
            xs_next = _load_x(x_ptr, offs + SCAN, offs + SCAN < k_hi, K, nw_ptr, rs, GLU, NORM, PARTS, HEAD_D)
            keep = _keep(xs, t) & inb
            ki = keep.to(tl.int32)
            pos = count + tl.cumsum(ki, axis=0) - 1
            tl.store(idx_ptr + pos, offs, mask=keep)
            tl.store(xv_ptr + pos, xs, mask=keep)
            count += tl.sum(ki, axis=0)
            offs += SCAN
        return count

    @triton.jit
    def _kept(idx_ptr, xv_ptr, j, count):
        """Entries j of the kept-channel list: (channel, value, valid); past the end: (0, 0, False)."""
        v = j < count
        return tl.load(idx_ptr + j, mask=v, other=0), tl.load(xv_ptr + j, mask=v, other=0.0), v

    @triton.jit
    def _kept_list_kernel(x_ptr, thr_ptr, idx_ptr, xv_ptr, cnt_ptr, nw_ptr, eps, K, SLICE,
                          SCAN: tl.constexpr, PDL: tl.constexpr, GLU: tl.constexpr,
                          NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, PARTS: tl.constexpr,
                          HEAD_D: tl.constexpr, PRELOAD: tl.constexpr):
        """Producer (PRODUCED=1 below): the kept-channel list of (segment, K slice) built once per
        launch instead of once per program; its count goes to cnt_ptr[seg * split_k + slice]."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
        seg = tl.program_id(0)
        k_lo = tl.program_id(1) * SLICE
        base = seg * K + k_lo
        count = _compact(x_ptr + 0, idx_ptr + base, xv_ptr + base, tl.load(thr_ptr + seg), k_lo,
                         tl.minimum(k_lo + SLICE, K), K, nw_ptr, eps, SCAN, GLU, NORM, NORM_BLOCK, PARTS, HEAD_D,
                         PRELOAD)
        tl.store(cnt_ptr + seg * tl.num_programs(1) + tl.program_id(1), count)

    @triton.jit
    def _accumulate(acc, w, x, SUM_ROWS: tl.constexpr):
        """acc + the tile's products x[k] * w[k, :] in fp32: summed over the rows as they arrive
        (SUM_ROWS, a [BLOCK_N] accumulator; see _rows_per_thread) or kept per row."""
        if SUM_ROWS:
            acc += tl.sum(w.to(tl.float32) * x[:, None], axis=0)
        else:
            acc += w.to(tl.float32) * x[:, None]
        return acc

    @triton.jit
    def _sparse_gemv_compact_kernel(
        x_ptr, wt_ptr, thr_ptr, bias_ptr, y_ptr, acc_ptr, cnt_ptr, idx_ptr, xv_ptr, lcnt_ptr,
        nw_ptr, eps, clr_ptr, CLR_N,
        N, K, stride_wk, B1, B2, SLICE,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCAN: tl.constexpr, PRODUCED: tl.constexpr,
        REDUCE: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_N: tl.constexpr,
        DEPTH: tl.constexpr, PDL: tl.constexpr, FENCE: tl.constexpr, SUM_ROWS: tl.constexpr,
        GLU: tl.constexpr, NORM: tl.constexpr, NORM_BLOCK: tl.constexpr,
        ACCUM: tl.constexpr, HAS_CLEAR: tl.constexpr, CLR_BLOCK: tl.constexpr,
        PARTS: tl.constexpr, HEAD_D: tl.constexpr, SHARE: tl.constexpr, stamp_ptr, STAMPS: tl.constexpr,
        PRELOAD: tl.constexpr, ROW_BYTES, PF_ROWS: tl.constexpr, PF_LANES: tl.constexpr,
    ):
        """Compacting variant: the loop runs over kept channels only, so its trip count (and its
        instruction count) falls with sparsity, where the masked loop only saves bytes."""
        _stamp(stamp_ptr, 0, tl.program_id(0), STAMPS)  # entry (with PDL: before the wait)
        _prefetch_w(wt_ptr, K, stride_wk, SLICE, ROW_BYTES, BLOCK_N, SHARE, PF_ROWS, PF_LANES)
        offs_n, nmask, seg, t = _prologue(thr_ptr, N, B1, B2, BLOCK_N, PDL)
        _stamp(stamp_ptr, 1, t, STAMPS)  # the previous kernel done, the threshold read
        _clear(clr_ptr, CLR_N, HAS_CLEAR, CLR_BLOCK)
        # 1. Threshold this program's slice of x and compact its kept channels into a list, at
        #    a place fixed by (segment, slice). The other programs of the same (segment, slice)
        #    write identical lists to the same place, so the overlapping writes are harmless and
        #    no program needs another's: there is no dependency between programs.
        #    PRODUCED: _kept_list_kernel, launched just before, has written the list already.
        #    SHARE programs (consecutive along the grid's K axis) own one slice together.
        slice_id = tl.program_id(1) // SHARE
        k_lo = slice_id * SLICE
        base = seg * K + k_lo
        if PRODUCED:
            count = tl.load(lcnt_ptr + seg * (tl.num_programs(1) // SHARE) + slice_id)
        else:
            count = _compact(x_ptr + 0, idx_ptr + base, xv_ptr + base, t, k_lo,
                             tl.minimum(k_lo + SLICE, K), K, nw_ptr, eps, SCAN, GLU, NORM, NORM_BLOCK, PARTS,
                             HEAD_D, PRELOAD)
        tl.debug_barrier()  # the list is complete before any thread reads it
        _stamp(stamp_ptr, 2, count, STAMPS)  # the kept list stored
        if SHARE > 1:
            # Each takes an equal share of the slice's kept channels. The kept count of a short
            # slice varies from slice to slice (a binomial at random x: the busiest of fused
            # QKV's 43 slices holds 1.21x the mean at 50%) and the busiest program ends the
            # launch; a longer slice split by its count varies less (kernels/README.md item 21).
            share_i = tl.program_id(1) % SHARE
            lo = share_i * count // SHARE
            count = (share_i + 1) * count // SHARE - lo
            base += lo

        # 2. Stream the kept rows of W^T, BLOCK_K at a time (dense tiles of gathered rows, each
        #    row a contiguous BLOCK_N-wide segment), software-pipelined by hand in registers:
        #    DEPTH tiles' W loads are in flight while the oldest tile is multiplied, and the
        #    indices of the next tile to load are fetched one step ahead of its W load. (Triton's
        #    own pipeliner, `tl.range(num_stages=)`, moved only the index loads ahead: a load that
        #    feeds no dot stays in its iteration, so each tile's W latency was exposed.) Loads of
        #    tiles past the list are fully masked and move no bytes.
        ar = tl.arange(0, BLOCK_K)
        w_base = wt_ptr + offs_n[None, :]
        i0, x0, v0 = _kept(idx_ptr + base, xv_ptr + base, ar, count)
        w0 = _load_rows(w_base, i0, v0, nmask, stride_wk, EVEN_N)
        i1, x1, v1 = _kept(idx_ptr + base, xv_ptr + base, BLOCK_K + ar, count)
        if SUM_ROWS:
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        if DEPTH == 1:
            for i in range(0, tl.cdiv(count, BLOCK_K)):
                w1 = _load_rows(w_base, i1, v1, nmask, stride_wk, EVEN_N)
                i2, x2, v2 = _kept(idx_ptr + base, xv_ptr + base, (i + 2) * BLOCK_K + ar, count)
                acc = _accumulate(acc, w0, x0, SUM_ROWS)
                w0, x0 = w1, x1
                i1, x1, v1 = i2, x2, v2
        else:
            w1 = _load_rows(w_base, i1, v1, nmask, stride_wk, EVEN_N)
            i2, x2, v2 = _kept(idx_ptr + base, xv_ptr + base, 2 * BLOCK_K + ar, count)
            for i in range(0, tl.cdiv(count, BLOCK_K)):
                w2 = _load_rows(w_base, i2, v2, nmask, stride_wk, EVEN_N)
                i3, x3, v3 = _kept(idx_ptr + base, xv_ptr + base, (i + 3) * BLOCK_K + ar, count)
                acc = _accumulate(acc, w0, x0, SUM_ROWS)
                w0, x0 = w1, x1
                w1, x1 = w2, x2
                i2, x2, v2 = i3, x3, v3
        if SUM_ROWS:
            part = acc
        else:
            part = tl.sum(acc, axis=0)
        _stamp(stamp_ptr, 3, tl.sum(part, axis=0), STAMPS)  # every W row arrived and summed
        _epilogue(part, offs_n, nmask, bias_ptr, y_ptr, acc_ptr, cnt_ptr, N, REDUCE, HAS_BIAS, FENCE,
                  ACCUM)
        _stamp(stamp_ptr, 4, tl.program_id(0), STAMPS)  # the epilogue issued


# Scratch (fp32 accumulator / partials, int32 arrival counters, the kept-channel lists), one
# set per device; the accumulator and the counters are always left zeroed by the kernel itself.
# Grown (never shrunk) on demand; prepare_weight pre-grows it so that nothing is allocated
# inside a captured CUDA graph.
_SCRATCH: dict = {}


def _scratch(device: torch.device, n_acc: int, n_part: int, n_cnt: int, n_idx: int = 0):
    """(zeroed fp32 accumulator, fp32 partials, zeroed int32 counters, int32 index list,
    fp32 value list)."""
    key = (device.type, device.index)
    acc, part, cnt, idx, xv = _SCRATCH.get(key, (None,) * 5)
    if acc is None or acc.numel() < n_acc:
        acc = torch.zeros(max(n_acc, 1 << 15), dtype=torch.float32, device=device)
    if part is None or part.numel() < n_part:
        part = torch.empty(max(n_part, 1 << 15), dtype=torch.float32, device=device)
    if cnt is None or cnt.numel() < n_cnt:
        cnt = torch.zeros(max(n_cnt, 1 << 12), dtype=torch.int32, device=device)
    if idx is None or idx.numel() < n_idx:
        idx = torch.empty(max(n_idx, 1 << 15), dtype=torch.int32, device=device)
        xv = torch.empty(max(n_idx, 1 << 15), dtype=torch.float32, device=device)
    _SCRATCH[key] = (acc, part, cnt, idx, xv)
    return acc, part, cnt, idx, xv


def _fit_block_n(block_n: int, block_k: int, splits) -> tuple[int, int]:
    """Shrink BLOCK_N (growing BLOCK_K to keep the tile size) until it divides every segment."""
    bounds = splits[:-1]
    while block_n > 16 and any(s % block_n for s in bounds):
        block_n //= 2
        block_k *= 2
    return block_n, block_k


_SM_COUNT: dict = {}
_CAPABILITY: dict = {}


def _capability(device: torch.device) -> int:
    """Major compute capability: PDL (griddepcontrol) needs 9 (Hopper) or newer; on an A100 a
    PDL config runs as a plain launch."""
    if device.index not in _CAPABILITY:
        _CAPABILITY[device.index] = torch.cuda.get_device_capability(device)[0]
    return _CAPABILITY[device.index]


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few K slices, to exercise split-K
    if device.index not in _SM_COUNT:
        _SM_COUNT[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device.index]


def _grid(N, K, block_n, block_k, progs_per_sm, device):
    """(grid_n, split_k, iters): about progs_per_sm programs per SM, each ITERS tiles long."""
    grid_n = triton.cdiv(N, block_n)
    k_tiles = triton.cdiv(K, block_k)
    want = max(1, round(progs_per_sm * _sm_count(device) / grid_n))
    iters = triton.cdiv(k_tiles, min(want, k_tiles))
    return grid_n, triton.cdiv(k_tiles, iters), iters


def _launch(x1: torch.Tensor, wt: torch.Tensor, thr: torch.Tensor, splits, bias, cfg,
            glu: bool = False, out: Optional[torch.Tensor] = None, clear: Optional[torch.Tensor] = None,
            norm_weight: Optional[torch.Tensor] = None, eps: float = 1e-5,
            partials: tuple[int, int] = (0, 1), stamps: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One token: x1 [K] contiguous -> y [N] in x1's dtype, with launch config `cfg` (a Config).
    glu: x1 is [gate | up] (2K) and the input is silu(gate) * up, computed as the kernel reads x.
    out: an fp32 [N] vector the product is added to (sparse_gemv_into), returned instead of a
    new y; clear: an fp32 vector this launch zeroes; norm_weight: x1 is the residual stream and
    the input is norm_input(x1, norm_weight, eps), computed as the kernel reads x; partials =
    (splits, head_dim), splits > 0: x1 holds a split attention's partials and the input is their
    combination (attention_input), computed as the kernel reads x. stamps: an int64 tensor of
    [programs, 12] the compacting kernel writes its timeline into (kernels/gemv_timeline.py, GPU
    only; _stamp)."""
    K, N = wt.shape
    cfg = Config(*cfg)
    block_n, block_k = _fit_block_n(cfg.block_n, cfg.block_k, splits)
    cfg = cfg._replace(block_n=min(block_n, triton.next_power_of_2(N)),
                       block_k=min(block_k, triton.next_power_of_2(K)))
    accum = out is not None
    y = out if accum else torch.empty(N, dtype=x1.dtype, device=x1.device)
    bounds = list(splits[:-1])
    if any(b % cfg.block_n for b in bounds):  # segments not aligned to any usable block: one launch each
        if stamps is not None:
            raise ValueError(f"stamps: segments {tuple(splits)} are not aligned to {cfg.block_n}-column blocks, "
                             "so this runs one launch per segment; stamp one segment at a time")
        start = 0
        for i, n in enumerate(splits):
            sub_bias = None if bias is None else bias[start:start + n]
            sub = _launch(x1, wt[:, start:start + n], thr[i:i + 1], (n,), sub_bias, cfg, glu,
                          y[start:start + n] if accum else None, clear if i == 0 else None, norm_weight, eps,
                          partials)
            if not accum:
                y[start:start + n] = sub
            start += n
        return y
    if len(bounds) > 2:
        raise ValueError("at most 3 segments per fused launch")
    b1 = bounds[0] if len(bounds) >= 1 else N
    b2 = bounds[0] + bounds[1] if len(bounds) >= 2 else N
    pdl = bool(cfg.pdl) and HAVE_PDL and x1.is_cuda and _capability(x1.device) >= 9
    norm = norm_weight is not None
    common = dict(BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, REDUCE=cfg.reduce,
                  HAS_BIAS=bias is not None, EVEN_N=N % cfg.block_n == 0, PDL=pdl, FENCE=x1.is_cuda and GPU_FENCE,
                  GLU=glu, NORM=norm, NORM_BLOCK=_norm_block(K), ACCUM=accum,
                  PARTS=partials[0], HEAD_D=partials[1],
                  num_warps=cfg.warps, **({"launch_pdl": True} if pdl else {}),
                  **({"maxnreg": cfg.maxnreg} if cfg.maxnreg and x1.is_cuda else {}))
    bias_arg = bias if bias is not None else y
    nw = norm_weight if norm else wt  # the dtype inputs are rounded to: the norm's, or the weights'
    grid_n = triton.cdiv(N, cfg.block_n)
    if cfg.slice:
        slice_ = min(cfg.slice, K)
        n_slices = triton.cdiv(K, slice_)
        split_k = n_slices * max(1, cfg.share)  # the grid's programs per output block
    else:
        grid_n, split_k, iters = _grid(N, K, cfg.block_n, cfg.block_k, cfg.progs_per_sm, x1.device)
    # clear: each of the grid's programs zeroes one CLR_BLOCK-long piece.
    clr_n = 0 if clear is None else clear.numel()
    clr = dict(HAS_CLEAR=clr_n > 0,
               CLR_BLOCK=max(16, triton.next_power_of_2(triton.cdiv(max(clr_n, 1), grid_n * split_k))))
    clr_arg = clear if clr_n else y
    kind = _input_kind(glu, norm, partials)
    if stamps is None and STAMP_HOOK is not None and cfg.slice:
        stamps = STAMP_HOOK(grid_n * split_k, dict(N=N, K=K, kind=kind))
    if stamps is not None and (not cfg.slice or not _stamps_fit(stamps, grid_n * split_k)):
        raise ValueError(f"stamps: the compacting kernel (slice > 0) writes 12 int64 per program, "
                         f"{grid_n} x {split_k} programs here: pass an int64 tensor of at least "
                         f"[{grid_n * split_k}, 12], got {stamps.dtype} {tuple(stamps.shape)} (config {tuple(cfg)})")
    if cfg.slice:
        scan = _scan(cfg, slice_)
        acc, part, cnt, idx, xv = _scratch(x1.device, N, N * split_k if cfg.reduce else 0, grid_n,
                                           3 * K + 3 * n_slices)
        lcnt = idx[3 * K:]  # the producer's counts, after the lists
        if cfg.producer:
            _kept_list_kernel[(len(splits), n_slices)](
                x1, thr, idx, xv, lcnt, nw, eps, K, slice_, SCAN=scan, PDL=pdl, GLU=glu, NORM=norm,
                NORM_BLOCK=common["NORM_BLOCK"], PARTS=partials[0], HEAD_D=partials[1], PRELOAD=NORM_PRELOAD,
                num_warps=cfg.warps,
                **({"launch_pdl": True} if pdl else {}))
        _sparse_gemv_compact_kernel[(grid_n, split_k)](
            x1, wt, thr, bias_arg, y, part if cfg.reduce else acc, cnt, idx, xv, lcnt, nw, eps, clr_arg, clr_n,
            N, K, wt.stride(0), b1, b2, slice_, SCAN=scan, PRODUCED=bool(cfg.producer),
            DEPTH=min(2, max(1, cfg.depth)), SUM_ROWS=_rows_per_thread(cfg, wt.dtype), SHARE=max(1, cfg.share),
            stamp_ptr=y if stamps is None else stamps, STAMPS=stamps is not None, PRELOAD=NORM_PRELOAD,
            **_prefetch(wt, cfg, kind, accum), **clr, **common)
        return y
    acc, part, cnt, _, _ = _scratch(x1.device, N, N * split_k if cfg.reduce else 0, grid_n)
    _sparse_gemv_kernel[(grid_n, split_k)](
        x1, wt, thr, bias_arg, y, part if cfg.reduce else acc, cnt, nw, eps, clr_arg, clr_n,
        N, K, wt.stride(0), b1, b2, iters, **clr, **common)
    return y


def _stamps_fit(stamps: torch.Tensor, programs: int) -> bool:
    """Whether `stamps` can take _stamp's rows for `programs` programs: 12 int64 each."""
    return stamps.dtype == torch.int64 and stamps.numel() >= programs * 12


def _pf_lanes(warps: int, rows: int) -> int:
    """_prefetch_w's LANES: one lane per row, at least one per thread of the program."""
    return max(32 * warps, triton.next_power_of_2(max(rows, 1)))


def _input_kind(glu: bool, norm: bool, partials) -> str:
    """What a launch's kernel reads as x (W_PREFETCH_KINDS names these)."""
    return "glu" if glu else "norm" if norm else "partials" if partials[0] else "plain"


def _prefetch(wt: torch.Tensor, cfg: Config, kind: str, accum: bool) -> dict:
    """_prefetch_w's arguments: W_PREFETCH_ROWS rows when the bulk prefetch applies
    (W_PREFETCH, sparse_gemv_into with this kind of input, a Hopper GPU, whole 16-byte-aligned
    BLOCK_N-wide rows), else none. Not sparse_gemv: its bf16 configs' short slices (64-96
    channels, 4 programs per SM) lost 10-13% with it at 50% (fused QKV, q|o; item 26)."""
    K, N = wt.shape
    row_bytes = cfg.block_n * wt.element_size()
    applies = W_PREFETCH and accum and kind in W_PREFETCH_KINDS
    hopper = wt.is_cuda and _capability(wt.device) >= 9
    aligned = (N % cfg.block_n == 0 and row_bytes % 16 == 0 and wt.data_ptr() % 16 == 0
               and (wt.stride(0) * wt.element_size()) % 16 == 0)
    ok = applies and hopper and aligned
    rows = W_PREFETCH_ROWS if ok else 0
    return dict(ROW_BYTES=row_bytes, PF_ROWS=rows, PF_LANES=_pf_lanes(cfg.warps, rows))


def _norm_block(K: int) -> int:
    """NORM's block: the whole residual stream of a Llama-3-8B (4096 entries) at once, one round
    trip to L2 instead of two in a loop (ptxas: 174 registers either way for the decoder's configs)."""
    return min(triton.next_power_of_2(K), 4096)


def _scan(cfg: Config, slice_: int) -> int:
    """Channels per prefix-sum step of the compacting kernel, by default 8 per thread: 32 per
    thread took 250 registers (4 warps) and so cut the programs per SM."""
    return min(triton.next_power_of_2(slice_), cfg.scan or 256 * cfg.warps)


def _rows_per_thread(cfg: Config, dtype: torch.dtype) -> bool:
    """SUM_ROWS: sum each tile's rows as they arrive into a [BLOCK_N] accumulator instead of
    keeping a [BLOCK_K, BLOCK_N] tile of fp32 partial sums. Possible when Triton's layout gives
    each thread whole columns of the tile (16-byte vectors along N, all threads and warps along N:
    the sum stays in registers; otherwise it would cross warps through shared memory every
    step). It saves registers: 104 instead of 167 for (1024 columns, 8 rows, 4 warps), 143
    instead of 239 with 2 tiles in flight (ptxas, sm_90a), so more programs fit per SM.
    cfg.sum_rows = 1 / 0 asks for it or not; -1 (default) takes it in bf16 and fp32 but not in
    fp16, where sweep 9's configs ran 10-20% slower than in bf16 on the H200 (down at 50%: 1.36x
    against 1.75x; kernels/README.md items 12-13)."""
    layout_ok = cfg.block_n >= (16 // dtype.itemsize) * 32 * cfg.warps
    if cfg.sum_rows >= 0:
        return bool(cfg.sum_rows) and layout_ok
    return dtype != torch.float16 and layout_ok


def _use_triton(x: torch.Tensor) -> bool:
    return HAVE_TRITON and (x.is_cuda or (INTERPRET and x.device.type == "cpu"))


def _sparse_gemv_impl(x, wt, thresholds, splits, bias, glu=False):
    from .tuning import config_for

    K, N, splits = _check(x, wt, thresholds, splits, glu)
    rows = x.numel() // x.shape[-1] if K else 0
    if rows != 1 or not _use_triton(x) or wt.stride(1) != 1:
        if glu:
            x = glu_input(x, wt.dtype)
        if rows == 1 or not x.is_cuda:
            return sparse_gemv_reference(x, wt, thresholds, splits, bias)
        # Several tokens: mask explicitly, then one dense product per segment (cuBLAS).
        thr = thresholds.float().reshape(-1)
        outs, start = [], 0
        for i, n in enumerate(splits):
            xm = torch.where(keep_mask(x, thr[i]), x, torch.zeros((), dtype=x.dtype, device=x.device))
            outs.append(xm @ wt[:, start:start + n].to(x.dtype))
            start += n
        y = torch.cat(outs, dim=-1)
        return y if bias is None else y + bias.to(y.dtype)
    thr = thresholds.reshape(-1).to(device=x.device, dtype=torch.float32).contiguous()
    y = _launch(x.reshape(-1).contiguous(), wt, thr, splits, bias, config_for(N, K, x.dtype), glu)
    return y.reshape(*x.shape[:-1], N)


# ----------------------------------------------------------------------------- custom op

@torch.library.custom_op("teal_nb::sparse_gemv", mutates_args=())
def _sparse_gemv_op(x: torch.Tensor, wt: torch.Tensor, thresholds: torch.Tensor,
                    splits: list[int], bias: Optional[torch.Tensor] = None, glu: bool = False) -> torch.Tensor:
    return _sparse_gemv_impl(x, wt, thresholds, splits, bias, glu)


@_sparse_gemv_op.register_fake
def _(x, wt, thresholds, splits, bias=None, glu=False):
    return x.new_empty(*x.shape[:-1], wt.shape[1])


def _thresholds_on(thresholds, device) -> torch.Tensor:
    """The public functions' thresholds (a tensor, list or number) as a flat tensor on x's device."""
    if not torch.is_tensor(thresholds):
        thresholds = torch.tensor(thresholds, dtype=torch.float32)
    thresholds = thresholds.reshape(-1)
    return thresholds if thresholds.device == device else thresholds.to(device)


def sparse_gemv(x, wt, thresholds, splits=None, bias=None, glu=False):
    """y = (x masked by |x| > t per output segment) @ wt, in x's dtype.

    x: [..., K]; wt: [K, N] from prepare_weight; thresholds: fp32 [len(splits)];
    splits: output sizes summing to N (None: one segment); bias: [N] or None.
    glu: x is [..., 2K] = [gate | up], a fused gate/up projection's output, and the input is
    silu(gate) * up (glu_input), computed inside the kernel: down_proj without its own SiLU x up
    launch.
    One row of x runs the Triton kernel (GPU, or CPU under TRITON_INTERPRET=1); several rows on
    a GPU mask explicitly and use cuBLAS; anything else runs the reference.
    """
    thresholds = _thresholds_on(thresholds, x.device)
    splits = list(_splits(splits, wt.shape[-1]))
    return _sparse_gemv_op(x, wt, thresholds, splits, bias, bool(glu))


def _check_into(out, x, wt, clear, norm_weight, glu, partials=False):
    K, N = wt.shape
    rows = 1 if partials else x.numel() // x.shape[-1]
    if out.dtype != torch.float32 or not out.is_contiguous() or out.shape[-1] != N or out.numel() != rows * N:
        raise ValueError(f"out must be a contiguous fp32 tensor of {rows} x {N} "
                         f"values (one row of N outputs per row of x), got {out.dtype} {tuple(out.shape)}")
    if glu and norm_weight is not None:
        raise ValueError("glu and norm_weight exclude each other: down_proj's input is SiLU x up (glu), "
                         "qkv's and gate/up's the normed residual stream (norm_weight); pass one")
    if partials and (glu or norm_weight is not None):
        raise ValueError("partials exclude glu and norm_weight: o_proj's input is the attention output")
    if norm_weight is not None and norm_weight.shape != (K,):
        raise ValueError(f"norm_weight must be [{K}] (the RMSNorm weight of wt's K inputs), "
                         f"got {tuple(norm_weight.shape)}")
    if clear is not None:
        if clear.dtype != torch.float32 or not clear.is_contiguous():
            raise ValueError(f"clear must be a contiguous fp32 tensor (an fp32 buffer that a later "
                             f"sparse_gemv_into adds into), got {clear.dtype}"
                             + ("" if clear.is_contiguous() else ", not contiguous"))
        # (Addresses are not known while torch.compile traces: checked on eager calls.)
        for name, t in (() if torch.compiler.is_compiling() else (("out", out), ("x", x))):
            lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
            c_lo = clear.data_ptr()
            if clear.device == t.device and c_lo < hi and lo < c_lo + clear.numel() * 4:
                raise ValueError(f"clear overlaps {name}: it would be zeroed while the launch uses {name}; "
                                 "pass a separate buffer")


# Every argument positional, none defaulted: torch 2.11 drops trailing arguments equal to their
# defaults before bumping the version counters of the mutated ones, and `clear` went missing.
@torch.library.custom_op("teal_nb::sparse_gemv_into", mutates_args=("out", "clear"))
def _sparse_gemv_into_op(out: torch.Tensor, clear: Optional[torch.Tensor], x: torch.Tensor, wt: torch.Tensor,
                         thresholds: torch.Tensor, splits: list[int], bias: Optional[torch.Tensor],
                         glu: bool, norm_weight: Optional[torch.Tensor], eps: float, partials: bool) -> None:
    from .tuning import config_for

    rows = 1 if partials else x.numel() // x.shape[-1]
    if rows != 1 or not _use_triton(x) or wt.stride(1) != 1:
        return sparse_gemv_into_reference(out, x, wt, thresholds, splits, bias, glu, norm_weight, eps, clear,
                                          partials)
    K, N = wt.shape
    thr = thresholds.reshape(-1).to(device=x.device, dtype=torch.float32).contiguous()
    _launch(x.reshape(-1).contiguous(), wt, thr, splits, bias, config_for(N, K, wt.dtype, accum=True), glu,
            out.view(-1), None if clear is None else clear.view(-1), norm_weight, eps,
            (x.shape[1], x.shape[2] - 2) if partials else (0, 1))


def sparse_gemv_into(out, x, wt, thresholds, splits=None, bias=None, glu=False, norm_weight=None,
                     eps=1e-5, clear=None, partials=False) -> None:
    """out += (x masked by |x| > t per output segment) @ wt, summed in fp32 and not rounded.

    The accumulating form of sparse_gemv, for a decoder that keeps its residual stream in fp32:
    each program adds its partial sums into `out` with fp32 atomics and finishes, so there is no
    split-K arrival counter and no last program re-reading the total (kernels/README.md, item
    13). out: fp32 [..., N], contiguous (the residual stream for o and down; a zeroed buffer for
    qkv and gate/up). x, wt, thresholds, splits, bias, glu: as in sparse_gemv (glu rounds
    silu(gate) * up to wt's dtype). norm_weight: x is the residual stream and the input is
    norm_input(x, norm_weight, eps), RMSNorm computed inside the kernel as it reads x.
    clear: an fp32 tensor this launch zeroes (after the previous launch on the stream has
    finished), e.g. the buffer that the next qkv or gate/up launch adds into; it must not overlap
    out or x. partials: x is a split attention's fp32 partials [heads, splits, head_dim + 2]
    (decode_attention_partials) and the input is their combination, attention_input(x, wt.dtype),
    computed as the kernel reads x: o_proj does the attention's last step, so that the attention
    kernel has no combining tail (one token). Several rows of x: the reference, row by row.
    """
    thresholds = _thresholds_on(thresholds, x.device)
    K, N, splits = _check(x, wt, thresholds, splits, glu, partials)
    _check_into(out, x, wt, clear, norm_weight, glu, partials)
    _sparse_gemv_into_op(out, clear, x, wt, thresholds, list(splits), bias, bool(glu), norm_weight, float(eps),
                         bool(partials))


def prepare_weight(w) -> torch.Tensor:
    """nn.Linear weight(s) [N, K] -> the kernel's layout W^T [K, N], contiguous. Done once.

    A list/tuple of weights (e.g. [wq, wk, wv]) is concatenated along N first: the fused
    projection, called with splits=(Nq, Nk, Nv) and one threshold per segment.
    """
    if isinstance(w, (list, tuple)):
        w = torch.cat([wi.detach() for wi in w], dim=0)
    wt = w.detach().t().contiguous()
    if _use_triton(wt):
        from .tuning import config_for

        K, N = wt.shape
        for accum in (False, True):  # sparse_gemv's config and sparse_gemv_into's
            cfg = Config(*config_for(N, K, wt.dtype, accum))
            n_slices = triton.cdiv(K, min(cfg.slice, K)) if cfg.slice else triton.cdiv(K, min(cfg.block_k, K))
            _scratch(wt.device, N, N * n_slices * max(1, cfg.share) if cfg.reduce else 0, triton.cdiv(N, 16),
                     3 * K + 3 * n_slices)
    return wt
