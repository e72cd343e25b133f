"""`teal-nb allocate`: Algorithm 1 (block-wise greedy) on every layer of a model; resumable."""
from __future__ import annotations

HELP = ("block-wise greedy sparsity allocation (TEAL's Algorithm 1) for every layer; saves the paths "
        "(safetensors + JSON) and resumes a killed run")


def add_arguments(p):
    from teal_nb.greedy import GreedyConfig

    d = GreedyConfig()
    p.add_argument("--model", default="smollm2-135m", help="preset name, HF id or local folder")
    p.add_argument("--out", default=None,
                   help="allocation file (default: data/allocations/<model>.safetensors in the source "
                        "tree, else $TEAL_CACHE_DIR/allocations/)")
    p.add_argument("--base-step", type=float, default=d.base_step,
                   help=f"sparsity step of q; other sites step inversely to their size (TEAL: 0.05; default {d.base_step})")
    p.add_argument("--max-sparsity", type=float, default=d.max_sparsity,
                   help=f"effective block sparsity where the paths end (TEAL: 0.9; default {d.max_sparsity})")
    p.add_argument("--last-fraction", type=float, default=d.last_fraction,
                   help=f"block error on this last fraction of positions (TEAL: 0.25; default {d.last_fraction})")
    p.add_argument("--prefill", default=d.prefill, choices=["last_half", "all"],
                   help="sparse calibration positions (TEAL: last_half)")
    p.add_argument("--sequences", type=int, default=d.sequences, help="C4 calibration sequences (TEAL: 10 of Alpaca)")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sequence (TEAL: 2048)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--method", default=d.method, choices=["abs", "signed"],
                   help="threshold from the |x| quantile (ours) or TEAL's signed icdf")
    p.add_argument("--error", default=d.error, choices=["rel_mse", "teal_l2"], help="block error measure")
    p.add_argument("--baseline-every", type=int, default=d.baseline_every,
                   help="with --no-uniform-candidate: measure uniform allocation's error every N path rows "
                        "(with the uniform candidate it is measured at every row)")
    p.add_argument("--no-uniform-candidate", dest="uniform_candidate", action="store_false",
                   help="TEAL's search: single-site steps only, no uniform point among the candidates "
                        "(then greedy can be worse than uniform at some rows)")
    p.add_argument("--dtype", default=None, help="model dtype (default: the preset's)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (1 is faster than 2 on a machine shared with other jobs)")
    p.add_argument("--no-progress", action="store_true")


def run(args):
    import json
    import time

    import torch

    from teal_nb.greedy import GreedyConfig, compute_allocation
    from teal_nb.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = GreedyConfig(base_step=args.base_step, max_sparsity=args.max_sparsity,
                       last_fraction=args.last_fraction, prefill=args.prefill, sequences=args.sequences,
                       seq_len=args.seq_len, seed=args.seed, method=args.method, error=args.error,
                       baseline_every=args.baseline_every, uniform_candidate=args.uniform_candidate).check()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_model(args.model, dtype=args.dtype, device=device)
    t0 = time.perf_counter()
    alloc = compute_allocation(model, tok, cfg, out=args.out, progress=not args.no_progress)
    wall = time.perf_counter() - t0
    from teal_nb.greedy import find_allocation
    summary = {"model": alloc.model, "out": str(args.out or find_allocation(model)),
               "layers": alloc.n_layers, "rows": int(alloc.sparsity.shape[1]),
               "max_sparsity": alloc.max_sparsity, "wall_s_this_run": round(wall, 1),
               "seconds_total_all_runs": round(alloc.meta["seconds_total"], 1),
               "cpu_seconds_total_all_runs": round(alloc.meta["cpu_seconds_total"], 1),
               "resumed_layers": alloc.meta["resumed_layers"], "threads": torch.get_num_threads()}
    measured = ~alloc.uniform_error.isnan()
    summary["uniform_candidate"] = alloc.config.get("uniform_candidate", False)
    summary["rows_greedy_worse_than_uniform"] = int((alloc.error[measured] > alloc.uniform_error[measured]).sum())
    for target in (0.25, 0.5):
        if target <= alloc.max_sparsity:
            measured = (~alloc.uniform_error[0].isnan()).nonzero().flatten()
            k = int(measured[(alloc.effective[measured] - target).abs().argmin()])
            summary[f"block_error_at_{target}"] = {
                "greedy": float(alloc.error[:, k].mean()), "uniform": float(alloc.uniform_error[:, k].mean())}
    print(json.dumps(summary, indent=1))
    return 0
