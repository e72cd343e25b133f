"""`teal-nb bench-decode`: end-to-end decode tokens/s, dense and sparse, on one GPU."""
from __future__ import annotations

HELP = ("decode tokens/s of a preset's shape (random weights): dense and TEAL-sparse at several "
        "sparsities, thresholds calibrated on decode steps; writes a JSON with provenance")


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(v) for v in s.split(",") if v.strip())


def add_arguments(p) -> None:
    p.add_argument("--preset", default="llama-3-8b", help="model shape (default: llama-3-8b)")
    p.add_argument("--dtypes", default="bfloat16,float16", help="comma-separated (default: bfloat16,float16)")
    p.add_argument("--sparsities", type=_floats, default=(0.5, 0.4, 0.25, 0.65),
                   help="uniform target sparsities, in the order run (default: 0.5,0.4,0.25,0.65)")
    p.add_argument("--sparsities-float16", type=_floats, default=None,
                   help="uniform sparsities for float16 if other than --sparsities (e.g. 0.5; float16 then gets "
                        "no non-uniform run)")
    p.add_argument("--nonuniform-at", type=_floats, default=(0.5,),
                   help="sparsities that also get a non-uniform (greedy-like) allocation (default: 0.5)")
    p.add_argument("--backend", default="triton", choices=("triton", "torch"), help="sparse backend")
    p.add_argument("--runs", type=int, default=5, help="timed generations per setting (median; default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed generations first (compile, CUDA graph)")
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--prompt-len", type=int, default=5)
    p.add_argument("--n-layers", type=int, default=None, help="fewer layers (smoke tests)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--no-compile", action="store_true", help="eager decode steps")
    p.add_argument("--calib-prompt", default="same", choices=("same", "other"),
                   help="calibrate thresholds on the benchmark prompt's own decode steps (default, as the "
                        "authors did) or on another random prompt's")
    p.add_argument("--no-dense-layout", action="store_true",
                   help="dense projections always through F.linear (default: per projection, W or W^T, "
                        "whichever cuBLAS reads faster in a timing at the start of the run)")
    p.add_argument("--calib-iters", type=int, default=4, help="sparse calibration passes at most (default 4)")
    p.add_argument("--calib-tol", type=float, default=0.01,
                   help="stop calibrating once every (layer, site) is within this of its target (default 0.01)")
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="skip what would not finish within this many seconds (default 540)")
    p.add_argument("--out", default="kernels/results/h200/decode.json", help="JSON output ('' for none)")


def run(args) -> int:
    import sys

    import torch

    from teal_nb.decode_bench import format_table, run_bench

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    res = run_bench(args.preset, tuple(d for d in args.dtypes.split(",") if d), args.sparsities,
                    args.nonuniform_at, args.runs, args.warmup, args.new_tokens, args.prompt_len,
                    args.backend, device, None if args.no_compile else "reduce-overhead", args.n_layers,
                    calib_iters=args.calib_iters, calib_tol=args.calib_tol, calib_prompt=args.calib_prompt, budget_s=args.budget_s,
                    dense_layout=not args.no_dense_layout,
                    sparsities_by_dtype={"float16": args.sparsities_float16} if args.sparsities_float16 else None, out=args.out or None, command=" ".join(sys.argv))
    print(format_table(res["records"]))
    if args.out:
        print(f"wrote {args.out}")
    return 0
