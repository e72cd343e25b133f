"""`teal-nb bench-gemv`: time the sparse GEMV against cuBLAS on this GPU and record the results."""
from __future__ import annotations

HELP = "benchmark the Triton sparse GEMV against cuBLAS (one GPU); writes kernels/results/<gpu>/gemv.json"


def add_arguments(p):
    p.add_argument("--out", default=None,
                   help="results JSON (default kernels/results/<gpu>/gemv.json)")
    p.add_argument("--shapes", nargs="*", default=None, help="shape names (default: all)")
    p.add_argument("--dtypes", nargs="*", default=["bf16", "fp16"], choices=["bf16", "fp16", "fp32"])
    p.add_argument("--sparsities", nargs="*", type=float, default=None)
    p.add_argument("--n-calls", type=int, default=200, help="calls per CUDA graph")
    p.add_argument("--reps", type=int, default=10, help="graph replays (median)")
    p.add_argument("--no-chain", dest="chain", action="store_false",
                   help="skip the whole-layer chain (four fused projections back to back per graph)")
    p.add_argument("--tune-table", default=None,
                   help="JSON from kernels/tune_gemv.py whose 'best' configs override the package table")


def run(args):
    import json
    import os
    import sys

    import torch

    if not torch.cuda.is_available():
        raise ValueError("bench-gemv needs a CUDA GPU (the CPU interpreter is for correctness only)")
    from teal_nb.kernels import bench, tuning
    from teal_nb.results import write_json

    if args.tune_table:
        best = json.load(open(args.tune_table))["best"].values()
        if not any("dtype" in b for b in best):
            tuning.FP16.clear()  # a sweep of one dtype: its choice holds for every dtype
        tuning.TABLE.update({(b["N"], b["K"]): tuple(b["cfg"]) for b in best if b.get("dtype", "bf16") == "bf16"})
        tuning.FP16.update({(b["N"], b["K"]): tuple(b["cfg"]) for b in best if b.get("dtype") == "fp16"})
        tuning.ACCUM.clear()  # the sweep's choice for both kernels
    shapes = args.shapes or list(bench.SHAPES)
    unknown = [s for s in shapes if s not in bench.SHAPES]
    if unknown:
        raise ValueError(f"unknown shapes {unknown}; known: {list(bench.SHAPES)}")
    sparsities = tuple(args.sparsities) if args.sparsities else bench.SPARSITIES
    records, copy = bench.bench(shapes, tuple(args.dtypes), sparsities, args.n_calls, args.reps)
    prov = bench.provenance("teal-nb bench-gemv " + " ".join(sys.argv[2:] if len(sys.argv) > 2 else []))
    prov["copy_gbps"] = round(copy, 1)
    prov["configs"] = {f"{n}x{k}": list(tuning.config_for(n, k))
                       for n, k, _ in (bench.SHAPES[s] for s in shapes)}
    prov["configs_fp16"] = {f"{n}x{k}": list(c) for (n, k), c in tuning.FP16.items()}
    prov["configs_accum"] = {f"{n}x{k}": list(c) for (n, k), c in tuning.ACCUM.items()}
    result = dict(provenance=prov, records=records, layer=bench.layer_summary(records))
    if args.chain and not args.shapes:
        dts = tuple(d for d in args.dtypes if d != "fp32")
        result["layer_chain"] = bench.layer_chain(dts, n_calls=args.n_calls * 2, reps=args.reps)
        result["layer_chain_fused"] = bench.layer_chain_fused(dts, n_calls=args.n_calls * 2, reps=args.reps)
    out = args.out
    if out is None:
        gpu = torch.cuda.get_device_name().lower()
        gpu = "h200" if "h200" in gpu else gpu.replace("nvidia ", "").replace(" ", "-")
        out = os.path.join("kernels", "results", gpu, "gemv.json")
    write_json(out, result)  # whole or not at all: a run cut short leaves the old record
    print(f"copy {copy:.0f} GB/s; wrote {out}")
    for row in result["layer"]:
        print(f"layer {row['dtype']} s={row['sparsity']:<5} ideal {row['ideal']:5.2f}  "
              f"unfused {row.get('speedup_unfused', float('nan')):5.2f}x  "
              f"fused {row.get('speedup_fused', float('nan')):5.2f}x  "
              f"fused+accum {row.get('speedup_fused_accum', float('nan')):5.2f}x")
    for key in ("layer_chain", "layer_chain_fused"):
        for row in result.get(key, []):
            print(f"{key} {row['dtype']} s={row['sparsity']:<5} dense {row['dense_us']:6.1f} us  "
                  f"sparse {row['sparse_us']:6.1f} us  {row['speedup']:5.2f}x")
    print(bench.table(records))
    return 0
