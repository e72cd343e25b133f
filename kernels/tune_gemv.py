"""Sweep the sparse GEMV's launch configs on the GPU; write the raw sweep and the chosen table.

    python kernels/tune_gemv.py --out kernels/results/h200/gemv_tune.json

For every Llama-3-8B shape of teal_nb.kernels.bench (bf16; fp16 moves the same bytes) and every
candidate config (teal_nb.kernels.gemv.Config), the kernel is timed with the bench's CUDA-graph
timer at sparsities 0, 0.5 and 0.8. A config's score is the weighted sum over those sparsities of
time / best time at that sparsity (weights WEIGHTS: 50% counts most). With --variants, the three
best of each shape are timed again with programmatic dependent launch and with the kept list
built by the producer kernel (sweep 6); since sweep 8 PDL configs may be chosen. The choice is pasted into
teal_nb/kernels/tuning.py (TABLE) by hand and committed; `teal-nb bench-gemv --tune-table` can
also read it directly.
"""
import argparse
import sys
import time

import torch

from teal_nb.kernels.bench import DTYPES, SHAPES, ShapeBench, provenance
from teal_nb.results import write_json

SPARS = (0.0, 0.5, 0.8)
WEIGHTS = {0.0: 1.0, 0.5: 2.0, 0.8: 0.5}


def compact(bn, bk, warps, slice_, depth=2, pdl=0):
    return (bn, bk, warps, 0, 0, slice_, depth, pdl)


# Sweep 8 (each of sweep 7's best configs with and without PDL, gemv_tune_v8.json) chose PDL for
# every shape.
# Sweep 9: SUM_ROWS (the tile's rows summed as they arrive into a 1-D accumulator, chosen by the
# launcher when each thread holds whole columns: BLOCK_N >= 256 x warps in 16-bit dtypes) needs
# 104 registers for an 8 x 1024 tile on 4 warps where sweep 8's kernel needed 167, so 4 programs
# fit per SM instead of 3, or 2 tiles in flight at 3 per SM. Grids of about 2, 3 and 4 programs
# per SM for (1024 columns, 4 warps), (512, 2 warps) and (256, 1 warp) tiles of 8 rows, 1 or 2
# tiles in flight, all with PDL; sweep 8's choice per shape for reference.
SWEEP9 = {
    "qkv_fused": [(512, 16, 4, 192, 1), (1024, 8, 4, 96, 1), (1024, 8, 4, 64, 1), (1024, 8, 4, 96, 2),
                  (512, 8, 2, 192, 1), (512, 8, 2, 128, 1), (512, 8, 2, 128, 2), (512, 8, 2, 96, 1)],
    "q|o": [(512, 16, 4, 128, 1), (1024, 8, 4, 64, 1), (1024, 8, 4, 64, 2), (1024, 8, 4, 48, 1),
            (512, 8, 2, 128, 1), (512, 8, 2, 96, 1), (512, 8, 2, 64, 1), (512, 8, 2, 64, 2)],
    "k|v": [(128, 32, 4, 128, 1), (1024, 8, 4, 32, 1), (512, 8, 2, 64, 1), (512, 8, 2, 32, 1),
            (256, 8, 1, 64, 1), (256, 8, 1, 32, 1)],
    "gate_up_fused": [(1024, 8, 4, 456, 1), (1024, 8, 4, 296, 1), (1024, 8, 4, 216, 1), (1024, 8, 4, 456, 2),
                      (1024, 8, 4, 296, 2), (512, 8, 2, 456, 1), (512, 8, 2, 296, 2)],
    "gate|up": [(512, 16, 4, 456, 1), (1024, 8, 4, 216, 1), (1024, 8, 4, 152, 1), (1024, 8, 4, 216, 2),
                (512, 8, 2, 456, 1), (512, 8, 2, 296, 1), (512, 8, 2, 456, 2)],
    "down": [(1024, 8, 4, 224, 1), (1024, 8, 4, 152, 1), (1024, 8, 4, 112, 1), (1024, 8, 4, 152, 2),
             (1024, 8, 4, 224, 2), (512, 8, 2, 224, 1), (512, 8, 2, 224, 2), (512, 8, 2, 152, 1)],
}


# Sweep 10 (sparse_gemv_into, both dtypes): the accumulating kernel needs 89 registers where the
# counter's needed 104 (ptxas, 8 x 1024 tile, 4 warps), and ptxas then issued the next tile's last
# W rows later in the loop; bf16 lost 10-30% on the SUM_ROWS shapes, as fp16 had in sweep 9.
# So: 2 tiles in flight, with ptxas capped at 128 registers (139 uncapped: 3 programs per SM, 4
# with the cap, no spills in bf16, 12 bytes in fp16), and fp16 with and without SUM_ROWS.
# Fields: BLOCK_N, BLOCK_K, warps, slice, depth, maxnreg, sum_rows (-1: the dtype's default).
SWEEP10 = {
    "qkv_fused": [(1024, 8, 4, 96, 1, 0, -1), (1024, 8, 4, 96, 2, 128, 1), (1024, 8, 4, 128, 2, 128, 1),
                  (512, 8, 2, 64, 2, 128, 1), (512, 8, 2, 128, 2, 128, 1), (512, 16, 4, 192, 1, 0, 0),
                  (512, 16, 4, 192, 2, 0, 0)],
    "q|o": [(512, 8, 2, 64, 1, 0, -1), (512, 8, 2, 64, 2, 128, 1), (512, 8, 2, 96, 2, 128, 1),
            (1024, 8, 4, 64, 2, 128, 1), (512, 16, 4, 128, 1, 0, 0), (512, 16, 4, 128, 2, 0, 0)],
    "k|v": [(128, 32, 4, 128, 1, 0, -1), (128, 32, 4, 64, 1, 0, -1), (256, 16, 4, 128, 1, 0, -1),
            (512, 8, 2, 64, 2, 128, 1), (256, 8, 1, 64, 2, 0, 1)],
    "gate_up_fused": [(1024, 8, 4, 296, 2, 0, -1), (1024, 8, 4, 296, 2, 128, 1), (1024, 8, 4, 216, 2, 128, 1),
                      (1024, 8, 4, 456, 1, 0, 0), (1024, 8, 4, 456, 2, 128, 1)],
    "gate|up": [(512, 16, 4, 456, 1, 0, -1), (1024, 8, 4, 216, 2, 128, 1), (1024, 8, 4, 152, 2, 128, 1),
                (512, 8, 2, 296, 2, 128, 1), (512, 16, 4, 456, 2, 0, 0)],
    "down": [(1024, 8, 4, 112, 1, 0, -1), (1024, 8, 4, 112, 2, 128, 1), (1024, 8, 4, 152, 2, 128, 1),
             (1024, 8, 4, 224, 2, 128, 1), (1024, 8, 4, 224, 1, 0, 0), (1024, 8, 4, 224, 2, 0, 0)],
}


# Sweep 11 (sparse_gemv_into): the two shapes short of the targets after sweep 10, fused
# QKV (0.82 x ideal at 50%) and k|v (below the authors at 25% in bf16), around sweep 10's choice
# with the 2-D accumulator: other slice lengths, tile depths and warps.
SWEEP11 = {
    "qkv_fused": [(1024, 8, 4, 96, 1, 0, 0), (1024, 8, 4, 64, 1, 0, 0), (1024, 8, 4, 128, 1, 0, 0),
                  (1024, 16, 4, 96, 1, 0, 0), (1024, 8, 8, 96, 1, 0, 0), (1024, 8, 8, 64, 1, 0, 0),
                  (512, 8, 2, 64, 1, 0, 0), (512, 8, 4, 96, 1, 0, 0), (512, 16, 4, 128, 1, 0, 0)],
    "k|v": [(128, 32, 4, 128, 1, 0, 0), (128, 32, 4, 256, 1, 0, 0), (128, 16, 2, 128, 1, 0, 0),
            (256, 16, 4, 256, 1, 0, 0), (128, 32, 4, 96, 1, 0, 0), (64, 64, 4, 128, 1, 0, 0),
            (256, 8, 2, 128, 1, 0, 0)],
}


# Sweep 13 (sparse_gemv_into, bf16): tuning.ACCUM took fp16's winners of sweep 10 for both dtypes
# with the 2-D accumulator, and most of them were never timed in bf16 (kernels/README.md, item 20);
# sweep 10's bf16 winners scored better on the sweep's own measure for fused gate/up. Each shape's
# ACCUM config, the same with SUM_ROWS and with 2 tiles in flight, and sweep 10's bf16 winner.
SWEEP13 = {
    "qkv_fused": [(1024, 8, 4, 96, 1, 0, 0), (1024, 8, 4, 96, 1, 0, 1), (1024, 8, 4, 96, 2, 0, 1),
                  (1024, 8, 4, 96, 2, 0, 0), (512, 16, 4, 192, 1, 0, 0)],
    "q|o": [(512, 8, 2, 64, 1, 0, 0), (512, 8, 2, 64, 1, 0, 1), (512, 8, 2, 64, 2, 0, 1), (512, 8, 2, 64, 2, 0, 0),
            (512, 16, 4, 128, 1, 0, 0)],
    "gate_up_fused": [(1024, 8, 4, 456, 1, 0, 0), (1024, 8, 4, 456, 1, 0, 1), (1024, 8, 4, 456, 2, 0, 1),
                      (1024, 8, 4, 296, 2, 0, 1), (1024, 8, 4, 296, 1, 0, 0)],
    "gate|up": [(512, 16, 4, 456, 1, 0, 0), (512, 16, 4, 456, 1, 0, 1), (1024, 8, 4, 296, 2, 0, 1),
                (1024, 8, 4, 216, 1, 0, 0)],
    "down": [(1024, 8, 4, 224, 1, 0, 0), (1024, 8, 4, 224, 1, 0, 1), (1024, 8, 4, 224, 2, 0, 1),
             (1024, 8, 4, 112, 2, 0, 1), (1024, 8, 4, 152, 1, 0, 0)],
}


# Sweep 14 (sparse_gemv_into, both dtypes): SHARE programs split one slice's kept channels evenly
# (kernels/README.md, item 21). A short slice's kept count varies (at random x the busiest of fused
# QKV's 43 slices holds 1.21x the mean at 50%, and a launch with every slice's count equal was
# 0.3-0.8 us faster per shape, item 14); a slice SHARE times as long, split by its count, varies
# ~sqrt(SHARE) times less, at the cost of a longer prefix sum per program. Each shape's
# tuning.ACCUM config (and bf16 k|v's of then), then the same grid size with SHARE = 2, 3 or 4.
# Fields: BLOCK_N, BLOCK_K, warps, slice, depth, maxnreg, sum_rows, share.
SWEEP14 = {
    "qkv_fused": [(1024, 8, 4, 96, 1, 0, 0, 1), (1024, 8, 4, 192, 1, 0, 0, 2), (1024, 8, 4, 288, 1, 0, 0, 3),
                  (1024, 8, 4, 384, 1, 0, 0, 4)],
    "q|o": [(512, 8, 2, 64, 1, 0, 0, 1), (512, 8, 2, 128, 1, 0, 0, 2), (512, 8, 2, 192, 1, 0, 0, 3),
            (512, 8, 2, 256, 1, 0, 0, 4)],
    "k|v": [(128, 32, 4, 128, 1, 0, 0, 1), (128, 32, 4, 256, 1, 0, 0, 2), (128, 32, 4, 512, 1, 0, 0, 4)],
    "gate_up_fused": [(1024, 8, 4, 296, 2, 0, 1, 1), (1024, 8, 4, 592, 2, 0, 1, 2), (1024, 8, 4, 1184, 2, 0, 1, 4),
                      (1024, 8, 4, 456, 1, 0, 0, 1), (1024, 8, 4, 912, 1, 0, 0, 2)],
    "gate|up": [(512, 16, 4, 456, 1, 0, 0, 1), (512, 16, 4, 912, 1, 0, 0, 2), (512, 16, 4, 1368, 1, 0, 0, 3)],
    "down": [(1024, 8, 4, 224, 1, 0, 0, 1), (1024, 8, 4, 448, 1, 0, 0, 2), (1024, 8, 4, 672, 1, 0, 0, 3),
             (1024, 8, 4, 896, 1, 0, 0, 4)],
}


# Sweep 15 (sparse_gemv_into, at s = 0, 0.25 and 0.5 as well): the two shapes still short of the
# issue after sweep 14. k|v is latency-bound (8 MB, ~5 us: the kept rows at the copy rate take 1.4
# us at 25%), so grids of 512 programs (96 registers: 5 per SM, 660 in one wave) with half the
# rows each, by slice or by SHARE; gate|up in fp16 at s = 0 (0.93-0.96x cuBLAS): sweep 13's fused
# gate/up config and 2 tiles in flight.
SWEEP15 = {
    "k|v": [(128, 32, 4, 128, 1, 0, 0, 1), (128, 32, 4, 256, 1, 0, 0, 2), (128, 32, 4, 128, 1, 0, 0, 2),
            (128, 32, 4, 64, 1, 0, 0, 1), (128, 16, 4, 128, 1, 0, 0, 2), (256, 16, 4, 256, 1, 0, 0, 2),
            (128, 32, 4, 64, 2, 0, 0, 1)],
    "gate|up": [(512, 16, 4, 456, 1, 0, 0, 1), (512, 16, 4, 456, 2, 0, 0, 1), (1024, 8, 4, 296, 2, 0, 1, 1),
                (1024, 8, 4, 216, 2, 0, 1, 1), (1024, 8, 4, 296, 1, 0, 0, 1), (512, 16, 4, 296, 1, 0, 0, 1)],
}


# Sweep 16 (sparse_gemv_into at s = 0, 0.25 and 0.5, with the W prefetch of item 26, which moved
# k|v's best back to 128-channel slices): the shapes still short of the issue after item 26. gate|up
# (0.95x cuBLAS at s = 0 in fp16, 0.82-0.84 x the ideal at 50%) and fused QKV (0.83 x the ideal at
# 50% in bf16): each shape's ACCUM config, its neighbours in slice and SHARE, and the 1024-column
# tiles with 2 tiles in flight that fused gate/up runs.
SWEEP16 = {
    "gate|up": [(512, 16, 4, 456, 1, 0, 0, 1), (512, 16, 4, 912, 1, 0, 0, 2), (512, 16, 4, 304, 1, 0, 0, 1),
                (512, 8, 2, 456, 1, 0, 0, 1), (1024, 8, 4, 296, 2, 0, 1, 1), (1024, 8, 4, 592, 2, 0, 1, 2),
                (1024, 8, 4, 216, 1, 0, 0, 1), (1024, 8, 4, 456, 1, 0, 0, 2)],
    "qkv_fused": [(1024, 8, 4, 192, 1, 0, 0, 2), (1024, 8, 4, 128, 1, 0, 0, 2), (1024, 8, 4, 256, 1, 0, 0, 2),
                  (1024, 8, 4, 96, 1, 0, 0, 1), (1024, 8, 4, 288, 1, 0, 0, 3), (512, 8, 2, 192, 1, 0, 0, 2),
                  (512, 8, 2, 128, 1, 0, 0, 1), (512, 16, 4, 192, 1, 0, 0, 2)],
}


# Sweep 17 (sparse_gemv_into, --dtypes fp16 bf16 --sparsities 0 0.25 0.5; gemv_tune_v17.json, git
# a072bd7): gate|up in fp16 was 0.844 x the ideal at 50% in the ninth session's record (git
# bb5a3b0), the last point short of issue 5. Sweep 16's winner (1024-column tiles, 2 programs per
# 456-channel slice), its neighbours in slice length and SHARE, and the same with 2 tiles in flight
# and the 1-D accumulator. The winner stayed (17.91 us fp16 at 50%; the next 18.65).
SWEEP17 = {
    "gate|up": [(1024, 8, 4, 456, 1, 0, 0, 2), (1024, 8, 4, 384, 1, 0, 0, 2), (1024, 8, 4, 512, 1, 0, 0, 2),
                (1024, 8, 4, 608, 1, 0, 0, 2), (1024, 8, 4, 684, 1, 0, 0, 3), (1024, 8, 4, 912, 1, 0, 0, 4),
                (1024, 8, 4, 456, 2, 0, 1, 2), (1024, 8, 4, 304, 1, 0, 0, 2), (1024, 16, 4, 456, 1, 0, 0, 2)],
}


# Sweep 18 (sparse_gemv_into, --sparsities 0 0.25 0.5; gemv_tune_v18.json, git 12e4ead): what
# sweeps 16-17 left out around gate|up's winner: 2048-column tiles of 4 or 8 rows (128 and 170
# registers, ptxas sm_90a), 8 warps per 1024-column tile (118), and a 4-row tile. 2048 x 8 on 8
# warps won (17.86 -> 17.36 us fp16 at 50%) and is gate|up's config; for the decoder's shapes
# (gemv_tune_v18_decode.json, git 6c425c3, bf16) it gained ~1-2% alone at 50% (fused gate/up lost
# 1% at s = 0) and nothing measurable in the step (kernels/README.md, item 34).
SWEEP18 = {
    "gate|up": [(1024, 8, 4, 456, 1, 0, 0, 2), (2048, 4, 4, 456, 1, 0, 0, 4), (2048, 4, 4, 456, 1, 0, 0, 2),
                (2048, 8, 8, 456, 1, 0, 0, 4), (2048, 8, 8, 456, 1, 0, 0, 2), (1024, 8, 8, 456, 1, 0, 0, 2),
                (1024, 8, 8, 228, 1, 0, 0, 1), (1024, 4, 4, 456, 1, 0, 0, 2)],
    # After gate|up's result (2048 x 8 on 8 warps won): the same tile for the decoder's launches.
    "gate_up_fused": [(1024, 8, 4, 296, 2, 0, 1, 1), (2048, 8, 8, 456, 1, 0, 0, 1), (2048, 8, 8, 912, 1, 0, 0, 2),
                      (2048, 8, 8, 296, 1, 0, 0, 1), (2048, 8, 8, 592, 1, 0, 0, 2), (2048, 8, 8, 1368, 1, 0, 0, 3)],
    "down": [(1024, 8, 4, 224, 1, 0, 0, 1), (2048, 8, 8, 224, 1, 0, 0, 1), (2048, 8, 8, 448, 1, 0, 0, 2)],
    "qkv_fused": [(1024, 8, 4, 192, 1, 0, 0, 2), (2048, 8, 8, 192, 1, 0, 0, 2), (2048, 8, 8, 96, 1, 0, 0, 1)],
}


def configs(shape, K, sweep=10):
    """The sweep's candidates (sweeps 5-9: kernels/README.md), all with PDL."""
    if sweep == 9:
        return [compact(*c, pdl=1) for c in SWEEP9.get(shape, [])]
    table = {11: SWEEP11, 13: SWEEP13, 14: SWEEP14, 15: SWEEP15, 16: SWEEP16, 17: SWEEP17,
             18: SWEEP18}.get(sweep, SWEEP10)
    # Sweeps 14-18 add SHARE as an eighth field; the others leave it at Config's default.
    return [(bn, bk, w, 0, 0, sl, d, 1, 0, 0, m, r, *share) for bn, bk, w, sl, d, m, r, *share in table.get(shape, [])]


def variants(cfg):
    """The same config with PDL, with the producer kernel, and with both."""
    c = (tuple(cfg) + (0,) * 10)[:10]  # Config fields: ..., depth, pdl, scan, producer
    if not c[5]:
        return [c[:7] + (1,)]
    return [c[:7] + (1, 0, 0), c[:7] + (0, 0, 1), c[:7] + (1, 0, 1)]


def score(rows):
    mins = {s: min(r["us"][str(s)] for r in rows) for s in SPARS}
    return lambda r: sum(WEIGHTS[s] * r["us"][str(s)] / mins[s] for s in SPARS)


def choose(raw):
    """Best config per shape (PDL allowed since sweep 8: the wrong result blamed on it in sweep 6
    was the layout race fixed in item 9 of kernels/README.md)."""
    best = {}
    for dt, shape in dict.fromkeys((r.get("dtype", "bf16"), r["shape"]) for r in raw):
        rows = [r for r in raw if r["shape"] == shape and r.get("dtype", "bf16") == dt]
        f = score(rows)
        b = min(rows, key=f)
        best[f"{dt}:{shape}"] = dict(dtype=dt, N=b["N"], K=b["K"], cfg=b["cfg"], us=b["us"], score=round(f(b), 4),
                                     dense_us=b["dense_us"], rel_err=b["rel_err"])
    return best


def time_cfg(sb, thr, cfg, shape, N, K, dense, a):
    try:
        if a.accum:  # sparse_gemv_into, as the decoder calls it
            us = {str(s): sb.accum_us(thr[s], cfg=cfg, n_calls=a.n_calls, reps=a.reps) for s in SPARS}
            err = sb.accum_error(thr[0.5], cfg=cfg)
        else:
            us = {str(s): sb.sparse_us(thr[s], cfg=cfg, n_calls=a.n_calls, reps=a.reps) for s in SPARS}
            err, _ = sb.accuracy(thr[0.5], cfg=cfg)
    except Exception as e:  # a config that fails to compile or launch is skipped
        print(f"{shape} {cfg}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr, flush=True)
        return None
    if not err < 2e-2:
        print(f"{shape} {cfg}: WRONG rel_err={err}", file=sys.stderr, flush=True)
        return None
    return dict(shape=shape, dtype=a.dtype, N=N, K=K, cfg=list(cfg), us=us, dense_us=dense, rel_err=err)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", nargs="*", default=["qkv_fused", "q|o", "k|v", "gate_up_fused", "gate|up", "down"])
    ap.add_argument("--n-calls", type=int, default=100)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=1e9, help="start no new shape after this")
    ap.add_argument("--dtypes", nargs="*", default=["bf16"], choices=["bf16", "fp16"])
    ap.add_argument("--sweep", type=int, default=10, choices=[9, 10, 11, 13, 14, 15, 16, 17, 18], help="candidate list")
    ap.add_argument("--accum", action="store_true", help="time sparse_gemv_into (the decoder's form)")
    ap.add_argument("--variants", action="store_true",
                    help="also time the 3 best of each shape with PDL and with the producer kernel")
    ap.add_argument("--sparsities", nargs="*", type=float,
                    help="time these instead of SPARS (weights: WEIGHTS', 1 for the others)")
    a = ap.parse_args()
    global SPARS, WEIGHTS
    if a.sparsities:
        SPARS = tuple(a.sparsities)
        WEIGHTS = {s: WEIGHTS.get(s, 1.0) for s in SPARS}
    raw, t0 = [], time.time()
    for a.dtype, shape in [(d, s) for d in a.dtypes for s in a.shapes]:
        if time.time() - t0 > a.budget_s:
            print(f"budget spent: {a.dtype} {shape} not tuned", flush=True)
            continue
        N, K, splits = SHAPES[shape]
        sb = ShapeBench(N, K, splits, DTYPES[a.dtype])
        dense = sb.dense_us(n_calls=a.n_calls, reps=a.reps)
        thr = {s: sb.thresholds(s) for s in SPARS}
        rows = [r for c in configs(shape, K, a.sweep) if (r := time_cfg(sb, thr, c, shape, N, K, dense, a))]
        if a.variants:
            top = sorted(rows, key=score(rows))[:3]
            rows += [r for t in top for c in variants(t["cfg"])
                     if (r := time_cfg(sb, thr, c, shape, N, K, dense, a))]
        raw += rows
        del sb
        torch.cuda.empty_cache()
        b = min(rows, key=score(rows))
        print(f"{a.dtype} {shape}: {time.time() - t0:.0f}s dense {dense:.2f} best {b['cfg']} " +
              " ".join(f"s={s}: {b['us'][str(s)]:.2f}" for s in SPARS), flush=True)
        write_json(a.out, dict(partial=True, raw=raw))  # what a cut-short sweep measured, whole
    best = choose(raw)
    write_json(a.out, dict(provenance=provenance(" ".join(sys.argv)), sparsities=SPARS, weights=WEIGHTS,
                           best=best, raw=raw))
    print("\nevery candidate: microseconds at s = " + " / ".join(map(str, SPARS)))
    for r in raw:
        print(f"{r['dtype']} {r['shape']:14s} {str(r['cfg']):52s} " + " ".join(f"{r['us'][str(s)]:6.2f}" for s in SPARS))
    print("\nper shape: speedup over cuBLAS of the best config, and of the best with PDL / producer")
    for key, b in best.items():
        rows = [r for r in raw if r["shape"] == key.split(":")[1] and r["dtype"] == b["dtype"]]
        line = f"{key:20s} {str(b['cfg']):52s} " + " ".join(
            f"{b['dense_us'] / b['us'][str(s)]:5.2f}" for s in SPARS)
        for label, pick in (("nopdl", lambda c: len(c) < 8 or not c[7]),
                            ("pdl", lambda c: len(c) >= 8 and c[7] == 1),
                            ("prod", lambda c: len(c) >= 10 and c[9] == 1)):
            sub = [r for r in rows if pick(r["cfg"])]
            if sub:
                r = min(sub, key=score(rows))
                line += f" | {label} " + " ".join(f"{r['dense_us'] / r['us'][str(s)]:.2f}" for s in SPARS)
        print(line)


if __name__ == "__main__":
    main()
