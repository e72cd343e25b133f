"""Sweep the sparse GEMV's launch configs on the GPU; write the raw sweep and the chosen table.

    python kernels/tune_gemv.py --out kernels/results/h200/gemv_tune.json

For every shape of teal_nb.kernels.bench.SHAPES (bf16; fp16 moves the same bytes) and every
config (BLOCK_N, BLOCK_K, num_warps, PROGS_PER_SM, REDUCE, SLICE), the kernel is timed with the bench's CUDA-graph
timer at sparsities 0, 0.5 and 0.8. The chosen config of a shape minimises the sum over those
sparsities of time / best time at that sparsity. The choice is pasted into
teal_nb/kernels/tuning.py (TABLE) by hand and committed.
"""
import argparse
import itertools
import json
import sys
import time

import torch

from teal_nb.kernels.bench import SHAPES, ShapeBench, provenance

SPARS = (0.0, 0.5, 0.8)


def configs():
    # Sweep 3 (NUM_STAGES): the best of sweep 2 (gemv_tune_v3.json), then the compacting kernel
    # pipelined by Triton (tile, SLICE, stages). Sweep 2 also had masked configs with 1-8 programs
    # per SM and the compacting kernel with its hand pipeline (NUM_STAGES = 0).
    yield from [(64, 64, 4, 4, 0, 0, 0), (512, 8, 4, 4, 0, 0, 0), (256, 32, 4, 0, 0, 1024, 0),
                (128, 32, 4, 0, 0, 512, 0), (128, 64, 4, 0, 0, 2048, 0)]
    for bn, bk in [(64, 64), (128, 32), (128, 64), (256, 16), (256, 32)]:
        for slice_ in (512, 1024, 2048):
            for stages in (3, 4):
                yield (bn, bk, 4, 0, 0, slice_, stages)


def choose(raw):
    best = {}
    for shape in dict.fromkeys(r["shape"] for r in raw):
        rows = [r for r in raw if r["shape"] == shape]
        mins = {s: min(r["us"][str(s)] for r in rows) for s in SPARS}
        score = lambda r: sum(r["us"][str(s)] / mins[s] for s in SPARS)
        b = min(rows, key=score)
        best[shape] = dict(N=b["N"], K=b["K"], cfg=b["cfg"], us=b["us"], score=round(score(b), 4),
                           dense_us=b["dense_us"])
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--n-calls", type=int, default=100)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=1e9, help="start no new shape after this")
    a = ap.parse_args()
    raw, t0 = [], time.time()
    for shape in a.shapes:
        if time.time() - t0 > a.budget_s:
            print(f"budget spent: {shape} not tuned", flush=True)
            continue
        N, K, splits = SHAPES[shape]
        sb = ShapeBench(N, K, splits, torch.bfloat16)
        dense = sb.dense_us(n_calls=a.n_calls, reps=a.reps)
        thr = {s: sb.thresholds(s) for s in SPARS}
        for cfg in configs():
            try:
                us = {str(s): sb.sparse_us(thr[s], cfg=cfg, n_calls=a.n_calls, reps=a.reps) for s in SPARS}
                err, _ = sb.accuracy(thr[0.5], cfg=cfg)
            except Exception as e:  # a config that fails to compile or launch is skipped
                print(f"{shape} {cfg}: {type(e).__name__}: {str(e)[:100]}", file=sys.stderr)
                continue
            if not err < 2e-2:
                print(f"{shape} {cfg}: WRONG rel_err={err}", file=sys.stderr)
                continue
            raw.append(dict(shape=shape, N=N, K=K, cfg=list(cfg), us=us, dense_us=dense, rel_err=err))
        del sb
        torch.cuda.empty_cache()
        print(f"{shape}: {time.time() - t0:.0f}s", flush=True)
        json.dump(dict(partial=True, raw=raw), open(a.out, "w"))
    best = choose(raw)
    json.dump(dict(provenance=provenance(" ".join(sys.argv)), sparsities=SPARS, best=best, raw=raw),
              open(a.out, "w"), indent=1)
    for shape, b in best.items():
        print(f"{shape:20s} {b['cfg']}  dense {b['dense_us']:.2f}  " +
              "  ".join(f"s={s}: {b['us'][str(s)]:.2f}" for s in SPARS))


if __name__ == "__main__":
    main()
