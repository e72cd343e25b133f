"""Fused threshold + input-sparse GEMV for one decode token, and its pure-torch reference.

y[n] = sum_k  x[k] * [|x[k]| > t(n)] * W[n, k]          (t(n): the threshold of n's segment)

At batch 1 a decoder projection is a matrix-vector product whose cost is reading W. If x[k] is
zeroed, column k of W is never needed. We store W transposed, `wt = W.T` with shape [K, N], so
that input channel k is one contiguous row of `wt`: skipping it skips whole 128-byte sectors.

Two kernels, one launch each, no zero-fill; `tuning.py` picks one per shape by measurement:

* Both: the grid is (N / BLOCK_N) x SPLIT_K; program (i, j) owns output columns
  i*BLOCK_N : (i+1)*BLOCK_N and one slice of the K input channels. There are only a few
  programs per SM, each streaming a long slice, so that fixed costs per program (the x load
  before the first W load, the arrival counter at the end) are paid about once per SM. A first
  version with one tile per program and thousands of programs spent most of its time in those
  fixed costs (see kernels/README.md).
* `_sparse_gemv_kernel` (masked): for each BLOCK_K tile of its slice it loads x, keeps the rows
  with |x| > t, and loads only those rows of the W^T tile (a masked-off row issues no memory
  transaction). Software-pipelined by hand: the next tile's W load is issued before the current
  tile's multiply-add, x two tiles ahead. Its trip count does not fall with sparsity.
* `_sparse_gemv_compact_kernel` (compacting): thresholds its whole slice (SLICE channels) at
  once, writes the kept channels' indices and values to a small scratch list with a prefix sum,
  then loops over kept rows only, BLOCK_K gathered rows at a time; the trip count falls with
  sparsity. Its loop is pipelined by Triton (NUM_STAGES > 0) or by hand (NUM_STAGES = 0).
* Products are summed in fp32.
* The partial sums of the K slices of one output block are combined without a second launch:
  REDUCE=0 adds them with fp32 atomics into a scratch vector; REDUCE=1 stores them into a
  scratch matrix [SPLIT_K, N] (deterministic). Then each program increments the block's arrival
  counter; the program that arrives last reads the total (REDUCE=0: reads the sum and stores
  zeros, leaving the scratch clean; REDUCE=1: sums the slices in a fixed order), adds the bias,
  writes y in the output dtype and resets the counter. Scratch is allocated once per device and
  always left clean, so no zero-fill pass is needed and any output dtype works.
* Fused projections (QKV, gate/up) pass one threshold per output segment; a program's segment
  is the one its first output column falls in (segments are multiples of BLOCK_N, the wrapper
  shrinks BLOCK_N until they are, or launches per segment).

NaN and inf: the rule is TEAL's, keep x[k] iff |x[k]| > t. NaN compares false, so a NaN input is
dropped (treated as zero, it never reaches y); +-inf is kept unless t = inf and then gives +-inf
(or NaN when +inf and -inf meet) as the dense product would. Kernel and reference follow the same
rule. A weight that is NaN/inf in a skipped row is never read by the kernel (the reference
multiplies it by 0 and gets NaN); weights are assumed finite.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

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


def _splits(splits: Optional[Sequence[int]], n: int) -> tuple[int, ...]:
    splits = (n,) if splits is None else tuple(int(s) for s in splits)
    if sum(splits) != n or any(s <= 0 for s in splits):
        raise ValueError(f"splits {splits} must be positive and sum to N={n}")
    return splits


def _check(x: torch.Tensor, wt: torch.Tensor, thresholds: torch.Tensor, splits):
    if wt.dim() != 2:
        raise ValueError(f"wt must be [K, N] (from prepare_weight), got {tuple(wt.shape)}")
    K, N = wt.shape
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features, wt expects K={K}")
    splits = _splits(splits, N)
    if thresholds.numel() != len(splits):
        raise ValueError(f"{thresholds.numel()} thresholds for {len(splits)} segments")
    return K, N, splits


# ----------------------------------------------------------------------------- reference

def sparse_gemv_reference(x, wt, thresholds, splits=None, bias=None):
    """Pure torch, fp32: mask x per segment (keep |x| > t), multiply by that segment's columns."""
    K, N, splits = _check(x, wt, thresholds, splits)
    xf = x.float()
    thr = thresholds.detach().float().reshape(-1).to(x.device)
    outs, start = [], 0
    for i, n in enumerate(splits):
        xm = torch.where(xf.abs() > thr[i], xf, torch.zeros((), device=x.device))
        outs.append(xm @ wt[:, start:start + n].float())
        start += n
    y = torch.cat(outs, dim=-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ----------------------------------------------------------------------------- kernel

if HAVE_TRITON:

    @triton.jit
    def _sparse_gemv_kernel(
        x_ptr, wt_ptr, thr_ptr, bias_ptr, y_ptr, acc_ptr, cnt_ptr,
        N, K, stride_wk, B1, B2, ITERS,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        REDUCE: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_N: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        split_k = tl.num_programs(1)
        n0 = pid_n * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        # This output block's segment (fused QKV: 0, 1, 2) picks its threshold.
        seg = (n0 >= B1).to(tl.int32) + (n0 >= B2).to(tl.int32)
        t = tl.load(thr_ptr + seg)

        # This program's K slice: ITERS tiles of BLOCK_K input channels.
        k0 = pid_k * ITERS * BLOCK_K
        ar_k = tl.arange(0, BLOCK_K)
        w_base = wt_ptr + offs_n[None, :]

        # Software pipeline by hand (registers, works in the interpreter too): the x tile is
        # loaded two steps ahead and the W tile one step ahead of the multiply-add, so each
        # program keeps a W tile in flight while it multiplies the previous one.
        offs_k = k0 + ar_k
        x_cur = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        # The fused threshold: keep channel k iff |x[k]| > t (NaN > t is False: dropped).
        keep = (tl.abs(x_cur) > t) & (offs_k < K)
        x_cur = tl.where(keep, x_cur, 0.0)
        # Only kept rows of the W^T tile are loaded: a row of W^T is one input channel,
        # contiguous in memory, so a dropped channel costs no memory traffic.
        if EVEN_N:
            w_cur = tl.load(w_base + offs_k[:, None] * stride_wk, mask=keep[:, None], other=0.0)
        else:
            w_cur = tl.load(w_base + offs_k[:, None] * stride_wk,
                            mask=keep[:, None] & nmask[None, :], other=0.0)
        offs_k = k0 + BLOCK_K + ar_k
        x_nxt = tl.load(x_ptr + offs_k, mask=(offs_k < K) & (ITERS > 1), other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        for i in range(1, ITERS):
            offs_k = k0 + i * BLOCK_K + ar_k
            keep = (tl.abs(x_nxt) > t) & (offs_k < K)
            x_nxt = tl.where(keep, x_nxt, 0.0)
            if EVEN_N:
                w_nxt = tl.load(w_base + offs_k[:, None] * stride_wk, mask=keep[:, None], other=0.0)
            else:
                w_nxt = tl.load(w_base + offs_k[:, None] * stride_wk,
                                mask=keep[:, None] & nmask[None, :], other=0.0)
            offs_k2 = offs_k + BLOCK_K
            x_nn = tl.load(x_ptr + offs_k2, mask=(offs_k2 < K) & (i + 1 < ITERS),
                           other=0.0).to(tl.float32)
            acc += w_cur.to(tl.float32) * x_cur[:, None]
            x_cur = x_nxt
            w_cur = w_nxt
            x_nxt = x_nn
        acc += w_cur.to(tl.float32) * x_cur[:, None]
        part = tl.sum(acc, axis=0)  # [BLOCK_N] fp32 partial sums of this K slice

        if split_k == 1:
            if HAS_BIAS:
                part += tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
            tl.store(y_ptr + offs_n, part, mask=nmask)  # cast to y's dtype on store
        else:
            if REDUCE == 0:
                # fp32 atomics into a scratch vector that the last program zeroes again.
                tl.atomic_add(acc_ptr + offs_n, part, mask=nmask, sem="relaxed")
            else:
                # Deterministic: one row of partial sums per K slice.
                tl.store(acc_ptr + pid_k * N + offs_n, part, mask=nmask)
            tl.debug_barrier()  # every thread's partials issued before the arrival is signalled
            arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
            if arrived == split_k - 1:  # the last program of this output block finishes it
                if REDUCE == 0:
                    # All K slices have added (acquired through the counter): read the sum
                    # from L2 and leave the scratch zeroed for the next call.
                    total = tl.load(acc_ptr + offs_n, mask=nmask, other=0.0, cache_modifier=".cg")
                    tl.store(acc_ptr + offs_n, tl.zeros([BLOCK_N], tl.float32), mask=nmask)
                else:
                    total = tl.zeros([BLOCK_N], tl.float32)
                    for j in range(0, split_k):
                        total += tl.load(acc_ptr + j * N + offs_n, mask=nmask, other=0.0,
                                         cache_modifier=".cg")
                if HAS_BIAS:
                    total += tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
                tl.store(y_ptr + offs_n, total, mask=nmask)  # cast to y's dtype on store
                tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed")


    @triton.jit
    def _sparse_gemv_compact_kernel(
        x_ptr, wt_ptr, thr_ptr, bias_ptr, y_ptr, acc_ptr, cnt_ptr, idx_ptr, xv_ptr,
        N, K, stride_wk, B1, B2,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SLICE: tl.constexpr,
        REDUCE: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_N: tl.constexpr,
        NUM_STAGES: tl.constexpr,
    ):
        """Compacting variant: the loop runs over kept channels only, so its trip count (and its
        instruction count) falls with sparsity, where the masked loop above only saves bytes."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        split_k = tl.num_programs(1)
        n0 = pid_n * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        seg = (n0 >= B1).to(tl.int32) + (n0 >= B2).to(tl.int32)
        t = tl.load(thr_ptr + seg)

        # 1. Threshold this program's slice of x and compact the kept channels: position of a
        #    kept channel = number of kept channels before it (a prefix sum). Indices and values
        #    go to a small scratch list, one per (segment, K slice). Programs of other output
        #    blocks with the same (segment, slice) write identical lists to the same place, so
        #    their overlapping writes are harmless, and each program reads only what it wrote.
        offs_s = pid_k * SLICE + tl.arange(0, SLICE)
        xs = tl.load(x_ptr + offs_s, mask=offs_s < K, other=0.0).to(tl.float32)
        keep = (tl.abs(xs) > t) & (offs_s < K)  # NaN > t is False: dropped
        ki = keep.to(tl.int32)
        pos = tl.cumsum(ki, axis=0) - 1
        count = tl.sum(ki, axis=0)
        base = (seg * split_k + pid_k) * SLICE
        tl.store(idx_ptr + base + pos, offs_s, mask=keep)
        tl.store(xv_ptr + base + pos, xs, mask=keep)
        tl.debug_barrier()  # the list is complete before any thread reads it

        # 2. Stream the kept rows of W^T, BLOCK_K at a time (dense tiles of gathered rows, each
        #    row a contiguous BLOCK_N-wide segment). NUM_STAGES > 0: Triton's software pipeliner
        #    keeps NUM_STAGES - 1 tiles in flight through shared memory; NUM_STAGES = 0: the
        #    register pipeline by hand (one tile ahead), as in the masked kernel.
        ar = tl.arange(0, BLOCK_K)
        w_base = wt_ptr + offs_n[None, :]
        n_tiles = tl.cdiv(count, BLOCK_K)
        if NUM_STAGES > 0:
            acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
            for i in tl.range(0, n_tiles, num_stages=NUM_STAGES):
                j = i * BLOCK_K + ar
                v = j < count
                ii = tl.load(idx_ptr + base + j, mask=v, other=0)
                xv = tl.load(xv_ptr + base + j, mask=v, other=0.0)
                if EVEN_N:
                    w = tl.load(w_base + ii[:, None] * stride_wk, mask=v[:, None], other=0.0)
                else:
                    w = tl.load(w_base + ii[:, None] * stride_wk, mask=v[:, None] & nmask[None, :],
                                other=0.0)
                acc += w.to(tl.float32) * xv[:, None]
        else:
            v = ar < count
            i_cur = tl.load(idx_ptr + base + ar, mask=v, other=0)
            x_cur = tl.load(xv_ptr + base + ar, mask=v, other=0.0)
            if EVEN_N:
                w_cur = tl.load(w_base + i_cur[:, None] * stride_wk, mask=v[:, None], other=0.0)
            else:
                w_cur = tl.load(w_base + i_cur[:, None] * stride_wk, mask=v[:, None] & nmask[None, :],
                                other=0.0)
            v_nxt = (BLOCK_K + ar) < count
            i_nxt = tl.load(idx_ptr + base + BLOCK_K + ar, mask=v_nxt, other=0)
            x_nxt = tl.load(xv_ptr + base + BLOCK_K + ar, mask=v_nxt, other=0.0)
            acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
            for i in range(1, n_tiles):
                if EVEN_N:
                    w_nxt = tl.load(w_base + i_nxt[:, None] * stride_wk, mask=v_nxt[:, None], other=0.0)
                else:
                    w_nxt = tl.load(w_base + i_nxt[:, None] * stride_wk,
                                    mask=v_nxt[:, None] & nmask[None, :], other=0.0)
                j2 = (i + 1) * BLOCK_K + ar
                v_nn = j2 < count
                i_nn = tl.load(idx_ptr + base + j2, mask=v_nn, other=0)
                x_nn = tl.load(xv_ptr + base + j2, mask=v_nn, other=0.0)
                acc += w_cur.to(tl.float32) * x_cur[:, None]
                x_cur = x_nxt
                w_cur = w_nxt
                x_nxt = x_nn
                i_nxt = i_nn
                v_nxt = v_nn
            acc += w_cur.to(tl.float32) * x_cur[:, None]
        part = tl.sum(acc, axis=0)

        if split_k == 1:
            if HAS_BIAS:
                part += tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
            tl.store(y_ptr + offs_n, part, mask=nmask)
        else:
            if REDUCE == 0:
                tl.atomic_add(acc_ptr + offs_n, part, mask=nmask, sem="relaxed")
            else:
                tl.store(acc_ptr + pid_k * N + offs_n, part, mask=nmask)
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
            if arrived == split_k - 1:
                if REDUCE == 0:
                    total = tl.load(acc_ptr + offs_n, mask=nmask, other=0.0, cache_modifier=".cg")
                    tl.store(acc_ptr + offs_n, tl.zeros([BLOCK_N], tl.float32), mask=nmask)
                else:
                    total = tl.zeros([BLOCK_N], tl.float32)
                    for j in range(0, split_k):
                        total += tl.load(acc_ptr + j * N + offs_n, mask=nmask, other=0.0,
                                         cache_modifier=".cg")
                if HAS_BIAS:
                    total += tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
                tl.store(y_ptr + offs_n, total, mask=nmask)
                tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed")


# Scratch (fp32 accumulator / partials and int32 arrival counters), one set per device, always
# left zeroed by the kernel itself. Grown (never shrunk) on demand; prepare_weight pre-grows it
# so that nothing is allocated inside a captured CUDA graph.
_SCRATCH: dict = {}


def _scratch(device: torch.device, n_acc: int, n_part: int, n_cnt: int, n_idx: int = 0):
    """(zeroed fp32 accumulator, fp32 partials, zeroed int32 counters, int32 index list,
    fp32 value list); only the accumulator and the counters need to start (and stay) zeroed."""
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


def _launch(x1: torch.Tensor, wt: torch.Tensor, thr: torch.Tensor, splits, bias, cfg) -> torch.Tensor:
    """One token: x1 [K] contiguous -> y [N] in x1's dtype.

    cfg = (BLOCK_N, BLOCK_K, num_warps, PROGS_PER_SM, REDUCE, SLICE[, NUM_STAGES]): tile shape, warps per
    program, the split-K reduction (0 atomic, 1 deterministic), and the variant: SLICE = 0 is the
    masked loop with about PROGS_PER_SM programs per SM; SLICE > 0 (a power of two) is the
    compacting kernel, each program owning SLICE input channels (PROGS_PER_SM unused), its loop
    pipelined by Triton with NUM_STAGES stages (0: by hand in registers).
    """
    K, N = wt.shape
    block_n, block_k, num_warps, pps, reduce, slice_, stages = (tuple(cfg) + (0, 0))[:7]
    block_n, block_k = _fit_block_n(block_n, block_k, splits)
    block_n = min(block_n, triton.next_power_of_2(N))
    block_k = min(block_k, triton.next_power_of_2(K))
    y = torch.empty(N, dtype=x1.dtype, device=x1.device)
    bounds = list(splits[:-1])
    if any(b % block_n for b in bounds):  # segments not aligned to any usable block: one launch each
        start = 0
        for i, n in enumerate(splits):
            sub_bias = None if bias is None else bias[start:start + n]
            y[start:start + n] = _launch(x1, wt[:, start:start + n], thr[i:i + 1], (n,), sub_bias,
                                         (block_n, block_k, num_warps, pps, reduce, slice_, stages))
            start += n
        return y
    if len(bounds) > 2:
        raise ValueError("at most 3 segments per fused launch")
    b1 = bounds[0] if len(bounds) >= 1 else N
    b2 = bounds[0] + bounds[1] if len(bounds) >= 2 else N
    common = dict(BLOCK_N=block_n, BLOCK_K=block_k, REDUCE=reduce, HAS_BIAS=bias is not None,
                  EVEN_N=N % block_n == 0, num_warps=num_warps)
    bias_arg = bias if bias is not None else y
    if slice_:
        slice_ = max(block_k, min(slice_, triton.next_power_of_2(K)))
        grid_n, split_k = triton.cdiv(N, block_n), triton.cdiv(K, slice_)
        acc, part, cnt, idx, xv = _scratch(x1.device, N, N * split_k if reduce else 0, grid_n,
                                           3 * split_k * slice_)
        _sparse_gemv_compact_kernel[(grid_n, split_k)](
            x1, wt, thr, bias_arg, y, part if reduce else acc, cnt, idx, xv,
            N, K, wt.stride(0), b1, b2, SLICE=slice_, NUM_STAGES=stages, **common)
        return y
    grid_n, split_k, iters = _grid(N, K, block_n, block_k, pps, x1.device)
    acc, part, cnt, _, _ = _scratch(x1.device, N, N * split_k if reduce else 0, grid_n)
    _sparse_gemv_kernel[(grid_n, split_k)](
        x1, wt, thr, bias_arg, y, part if reduce else acc, cnt,
        N, K, wt.stride(0), b1, b2, iters, **common)
    return y


def _use_triton(x: torch.Tensor) -> bool:
    return HAVE_TRITON and (x.is_cuda or (INTERPRET and x.device.type == "cpu"))


def _sparse_gemv_impl(x, wt, thresholds, splits, bias):
    from .tuning import config_for

    K, N, splits = _check(x, wt, thresholds, splits)
    rows = x.numel() // K if K else 0
    if rows != 1 or not _use_triton(x) or wt.stride(1) != 1:
        if rows == 1 or not x.is_cuda:
            return sparse_gemv_reference(x, wt, thresholds, splits, bias)
        # Several tokens: mask explicitly, then one dense product per segment (cuBLAS).
        thr = thresholds.float().reshape(-1)
        outs, start = [], 0
        for i, n in enumerate(splits):
            xm = torch.where(x.float().abs() > thr[i], x, torch.zeros((), dtype=x.dtype, device=x.device))
            outs.append(xm @ wt[:, start:start + n].to(x.dtype))
            start += n
        y = torch.cat(outs, dim=-1)
        return y if bias is None else y + bias.to(y.dtype)
    thr = thresholds.reshape(-1).to(device=x.device, dtype=torch.float32).contiguous()
    y = _launch(x.reshape(K).contiguous(), wt, thr, splits, bias, config_for(N, K))
    return y.reshape(*x.shape[:-1], N)


# ----------------------------------------------------------------------------- custom op

@torch.library.custom_op("teal_nb::sparse_gemv", mutates_args=())
def _sparse_gemv_op(x: torch.Tensor, wt: torch.Tensor, thresholds: torch.Tensor,
                    splits: list[int], bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _sparse_gemv_impl(x, wt, thresholds, splits, bias)


@_sparse_gemv_op.register_fake
def _(x, wt, thresholds, splits, bias=None):
    return x.new_empty(*x.shape[:-1], wt.shape[1])


def sparse_gemv(x, wt, thresholds, splits=None, bias=None):
    """y = (x masked by |x| > t per output segment) @ wt, in x's dtype.

    x: [..., K]; wt: [K, N] from prepare_weight; thresholds: fp32 [len(splits)];
    splits: output sizes summing to N (None: one segment); bias: [N] or None.
    One row of x runs the Triton kernel (GPU, or CPU under TRITON_INTERPRET=1); several rows on
    a GPU mask explicitly and use cuBLAS; anything else runs the reference.
    """
    if not torch.is_tensor(thresholds):
        thresholds = torch.tensor(thresholds, dtype=torch.float32)
    thresholds = thresholds.reshape(-1)
    if thresholds.device != x.device:
        thresholds = thresholds.to(x.device)
    splits = list(_splits(splits, wt.shape[-1]))
    return _sparse_gemv_op(x, wt, thresholds, splits, bias)


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
        bn, bk, _, _, reduce, slice_ = config_for(N, K)[:6]
        _scratch(wt.device, N, N * triton.cdiv(K, max(1, min(bk, K))) if reduce else 0,
                 triton.cdiv(N, 16), 3 * (K + max(slice_, bk)))
    return wt
