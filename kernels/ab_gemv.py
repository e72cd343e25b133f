"""A/B of a sparse GEMV kernel switch in one process, on one GPU: the same launches timed with a
module flag of teal_nb.kernels.gemv off and on, interleaved (off, on, off, on), each a median of
the bench's timer (CUDA graph, rotating weights).

    PYTHONPATH=. python kernels/ab_gemv.py --flag FLAG --out $OUT/ab_gemv.json

FLAG is a module-level boolean of gemv.py that _launch reads at every launch (REG_HEAD, ALL_ROWS
and STEAL at git ac9a376, 93e320a and 03a087d were; kernels/README.md, items 18, 19 and 24): a
switch under test is added as one, measured here, and kept or reverted.

Per shape (sparse_gemv_into with the package's configs, plain x): nothing kept (threshold +inf) and the
given sparsities; then the decoder's fused layer chain (bench.layer_chain_fused: norms inside,
SiLU x up inside, the residual adds). cuBLAS is timed once per shape in the same run. A table is
printed last: per point off and on (each the median of its passes), their ratio and the speedups.
"""
import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402


def main():
    from teal_nb.kernels import bench, gemv
    from teal_nb.results import write_json

    ap = argparse.ArgumentParser()
    ap.add_argument("--flag", required=True, help="a boolean of teal_nb.kernels.gemv read at launch")
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"])
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.0, 0.25, 0.4, 0.5, 0.65])
    ap.add_argument("--shapes", nargs="+", default=list(bench.FUSED_LAYER) + ["k|v", "gate|up"])
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--out", default="ab_gemv.json")
    a = ap.parse_args()
    if not isinstance(getattr(gemv, a.flag, None), bool):
        raise SystemExit(f"teal_nb.kernels.gemv.{a.flag} is not a boolean flag")

    def both(measure):
        """{"off": [...], "on": [...]}: `measure()` under each value of the flag, interleaved."""
        runs = {"off": [], "on": []}
        for _ in range(a.passes):
            for key, value in (("off", False), ("on", True)):
                setattr(gemv, a.flag, value)
                runs[key].append(measure())
        return runs

    records = []
    for dt in a.dtypes:
        for name in a.shapes:
            N, K, splits = bench.SHAPES[name]
            sb = bench.ShapeBench(N, K, splits, bench.DTYPES[dt])
            dense = sb.dense_us()
            for s in ["none"] + a.sparsities:
                thr = (torch.full((len(sb.splits),), float("inf"), device="cuda") if s == "none"
                       else sb.thresholds(s))
                rec = dict(kind="shape", shape=name, dtype=dt, sparsity=s, dense_us=round(dense, 3),
                           **both(lambda: round(sb.accum_us(thr), 3)))
                records.append(rec)
                print(json.dumps(rec), flush=True)
            del sb
            torch.cuda.empty_cache()
        # The chain: each pass one record per sparsity, in the order asked for.
        chain = both(lambda: bench.layer_chain_fused(dtypes=(dt,), sparsities=a.sparsities))
        for i, s in enumerate(a.sparsities):
            runs = {key: [passes[i] for passes in chain[key]] for key in ("off", "on")}
            rec = dict(kind="layer_chain_fused", shape="layer", dtype=dt, sparsity=s,
                       dense_us=round(statistics.median(r["dense_us"] for r in runs["off"] + runs["on"]), 3),
                       **{key: [r["sparse_us"] for r in rs] for key, rs in runs.items()})
            records.append(rec)
            print(json.dumps(rec), flush=True)
    write_json(a.out, {"provenance": bench.provenance(" ".join(sys.argv)), "flag": a.flag, "records": records})
    print(f"\n{a.flag}: us per launch (per layer for the chain), off / on, each the median of its passes")
    for r in records:
        off, on = statistics.median(r["off"]), statistics.median(r["on"])
        print(f"{r['dtype']} {r['shape']:14s} s={r['sparsity']!s:5s} cuBLAS {r['dense_us']:7.2f}  "
              f"off {off:7.2f}  on {on:7.2f}  on/off {on / off:.3f}  speedup {r['dense_us'] / off:.3f} -> "
              f"{r['dense_us'] / on:.3f}")


if __name__ == "__main__":
    with torch.no_grad():
        main()
