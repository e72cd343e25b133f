"""Where a sparse_gemv_into launch spends its time beyond streaming its kept rows, on one GPU.

    PYTHONPATH=. python kernels/gemv_fixed_cost.py --out $OUT/gemv_fixed_cost.json

For each Llama-3-8B shape of the fused layer, with the package's config (tuning.ACCUM) and the
bench's timer (teal_nb.kernels.bench: CUDA graph, rotating weights, median), it times:
- `random`: Gaussian x, threshold at the s-quantile of |x| (what bench-gemv records);
- `balanced`: the same x with, in every K slice that one program owns, exactly the same number
  of channels kept (the smallest |x| of each slice zeroed, threshold 0). A program's time
  follows its kept rows, and one wave of programs ends with its slowest, so random - balanced
  is what an uneven split of the kept channels over the slices costs;
- `none`: nothing kept (threshold +inf): the launch's fixed cost (prologue, compaction,
  epilogue) back to back;
- `all`: every channel kept (s = 0);
- `empty`: a kernel that does nothing but PDL's wait and trigger, on the same grid (and one
  that also adds one value atomically per program): the floor of a launch back to back;
and cuBLAS on the same x. It also reports, for the random x, the most kept channels in one
slice over their mean. A table is printed last.
"""
import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: E402


@triton.jit
def _empty_kernel(y_ptr, PDL: tl.constexpr, ATOMIC: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    if ATOMIC:
        tl.atomic_add(y_ptr + tl.program_id(0), 1.0, sem="relaxed")


def empty_us(grid, pdl: bool, atomic: bool) -> float:
    from teal_nb.kernels.bench import graph_us

    y = torch.zeros(grid[0], device="cuda")
    return graph_us([lambda: _empty_kernel[grid](y, PDL=pdl, ATOMIC=atomic, **({"launch_pdl": True} if pdl else {}))])


def balanced(x: torch.Tensor, slice_: int, s: float) -> torch.Tensor:
    """x with the round(s * n) smallest |x| of each slice of n channels set to zero."""
    xb = x.clone().reshape(-1)
    for lo in range(0, xb.numel(), slice_):
        seg = xb[lo:lo + slice_]
        drop = round(s * seg.numel())
        if drop:
            seg[seg.float().abs().argsort()[:drop]] = 0
    return xb.reshape(x.shape)


def main():
    from teal_nb.kernels.bench import (DTYPES, FUSED_LAYER, SHAPES, ShapeBench, copy_rate_gbps,
                                       provenance, threshold_for)
    from teal_nb.kernels.gemv import Config
    from teal_nb.kernels.tuning import config_for
    from teal_nb.results import write_json

    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", nargs="+", default=["bf16"])
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.4])
    ap.add_argument("--shapes", nargs="+", default=list(FUSED_LAYER) + ["k|v"])
    ap.add_argument("--out", default="gemv_fixed_cost.json")
    a = ap.parse_args()
    copy = copy_rate_gbps()
    records = []
    for dt in a.dtypes:
        dtype = DTYPES[dt]
        esize = torch.tensor([], dtype=dtype).element_size()
        for name in a.shapes:
            N, K, splits = SHAPES[name]
            sb = ShapeBench(N, K, splits, dtype)
            cfg = Config(*config_for(N, K, dtype, accum=True))
            slice_ = min(cfg.slice, K)
            x = sb.x
            thr = lambda t: torch.full((len(sb.splits),), t, device="cuda")  # noqa: E731
            grid = (math.ceil(N / cfg.block_n), math.ceil(K / slice_))
            rec = dict(shape=name, N=N, K=K, dtype=dt, slice=slice_, programs=grid[0] * grid[1],
                       empty_pdl_us=round(empty_us(grid, True, False), 3),
                       empty_pdl_atomic_us=round(empty_us(grid, True, True), 3),
                       empty_plain_us=round(empty_us(grid, False, False), 3), dense_us=round(sb.dense_us(), 3),
                       none_us=round(sb.accum_us(thr(float("inf"))), 3), all_us=round(sb.accum_us(thr(0.0)), 3))
            for s in a.sparsities:
                t = threshold_for(x, s)
                kept = (x.float().abs().reshape(-1) > t).float()
                per_slice = kept[:K // slice_ * slice_].reshape(-1, slice_).sum(1)
                sb.x = x
                r_us = sb.accum_us(thr(t))
                sb.x = balanced(x, slice_, s)
                b_us = sb.accum_us(thr(0.0))
                sb.x = x
                stream_us = (1 - s) * N * K * esize / (copy * 1e3)  # kept rows at the copy rate
                rec[f"s{s}"] = dict(random_us=round(r_us, 3), balanced_us=round(b_us, 3),
                                    stream_us=round(stream_us, 3),
                                    max_over_mean_kept=round(float(per_slice.max() / per_slice.mean()), 4))
            records.append(rec)
            print(json.dumps(rec), flush=True)
            del sb
            torch.cuda.empty_cache()
    write_json(a.out, {"provenance": {**provenance(" ".join(sys.argv)), "copy_GBps": round(copy, 1)},
                       "records": records})
    print(f"\ncopy {copy:.0f} GB/s; us per launch (cuBLAS, nothing kept, all kept; random / balanced / "
          f"streaming the kept rows at the copy rate)")
    for r in records:
        cells = "  ".join(f"s={s}: {r[f's{s}']['random_us']:.2f}/{r[f's{s}']['balanced_us']:.2f}/"
                          f"{r[f's{s}']['stream_us']:.2f} (max/mean {r[f's{s}']['max_over_mean_kept']:.2f})"
                          for s in a.sparsities)
        print(f"{r['dtype']} {r['shape']:14s} empty {r['empty_plain_us']:4.2f} / PDL {r['empty_pdl_us']:4.2f} / "
              f"+atomic {r['empty_pdl_atomic_us']:4.2f}  dense {r['dense_us']:6.2f} none {r['none_us']:5.2f} "
              f"all {r['all_us']:6.2f}  {cells}")


if __name__ == "__main__":
    with torch.no_grad():
        main()
