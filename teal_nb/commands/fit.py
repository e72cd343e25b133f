"""`teal-nb fit`: fit Gaussian, Laplace and generalized-normal laws to a model's calibration histograms."""
from __future__ import annotations

HELP = ("fit Gaussian, Laplace and generalized-normal laws to every (layer, hidden state) of a model's "
        "C4 calibration (cached); print the fit table")


def add_arguments(p):
    p.add_argument("--model", default="smollm2-135m", help="preset name, HF id or local folder")
    p.add_argument("--sequences", type=int, default=None, help="calibration sequences (default: the preset's)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, help="default: the preset's")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--out", default=None, help="also write the per-(layer, state) table (.csv or .json)")
    p.add_argument("--no-progress", action="store_true")


def summary(fits) -> dict:
    """Per hidden state, over layers: medians of the shape, likelihood gap and KS distances, and
    how many layers prefer each law."""
    import torch

    from ..config import HIDDEN_STATES

    best = fits.best()
    out = {}
    for s, state in enumerate(HIDDEN_STATES):
        col = [row[s] for row in best]
        out[state] = {
            "beta_median": fits.beta[:, s].median().item(),
            "beta_min": fits.beta[:, s].min().item(), "beta_max": fits.beta[:, s].max().item(),
            "delta_ll_median": fits.delta_ll()[:, s].median().item(),
            "laplace_better_layers": col.count("laplace"), "gaussian_better_layers": col.count("gaussian"),
            **{f"ks_{law}_median": fits.ks[law][:, s].median().item() for law in fits.ks},
            "kurtosis_median": torch.as_tensor(fits.stats["kurtosis"][:, s]).median().item(),
        }
    return out


def run(args):
    import json
    import sys

    import torch

    from ..calibration import cached_histograms
    from ..distributions import fit
    from ..models import load_model
    from ..results import provenance, write_json

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_model(args.model, dtype=args.dtype, device=device)
    hist = cached_histograms(model, tok, args.sequences, args.seq_len, args.seed, progress=not args.no_progress)
    fits = fit(hist)
    rows = fits.rows()
    result = {"model": fits.model, "calibration": hist.meta, "summary": summary(fits), "rows": rows,
              "provenance": provenance("teal-nb fit " + " ".join(sys.argv[2:]))}
    if args.out:
        if args.out.endswith(".csv"):
            import csv
            import os

            os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
            with open(args.out, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
        else:
            write_json(args.out, result)
    if args.json:
        print(json.dumps(result, default=float))
        return 0
    meta = hist.meta
    print(f"{fits.model}: C4 calibration, {meta.get('sequences')} x {meta.get('seq_len')} tokens "
          f"(seed {meta.get('seed')}). Laws centred at 0; ll in nats per value; "
          "delta_ll = ll_laplace - ll_gaussian (> 0: Laplace fits better); beta: generalized-normal shape "
          "(2 Gaussian, 1 Laplace).")
    print(f"\n{'state':<9} {'beta med':>8} {'[min, max]':>14} {'dLL med':>8} {'Laplace/Gauss':>14} "
          f"{'KS gauss':>9} {'KS lapl':>8} {'KS gn':>7} {'kurt med':>9}")
    for state, s in result["summary"].items():
        print(f"{state:<9} {s['beta_median']:8.2f} {'[%.2f, %.2f]' % (s['beta_min'], s['beta_max']):>14} "
              f"{s['delta_ll_median']:8.3f} {'%d/%d' % (s['laplace_better_layers'], s['gaussian_better_layers']):>14} "
              f"{s['ks_gaussian_median']:9.3f} {s['ks_laplace_median']:8.3f} {s['ks_gennorm_median']:7.3f} "
              f"{s['kurtosis_median']:9.1f}")
    print(f"\n{'layer':>5} {'state':<9} {'std':>8} {'kurt':>9} {'beta':>6} {'dLL':>7} {'KS g':>6} {'KS l':>6} "
          f"{'KS gn':>6}  best")
    for r in rows:
        print(f"{r['layer']:5d} {r['state']:<9} {r['std']:8.4f} {r['kurtosis']:9.1f} {r['beta']:6.2f} "
              f"{r['delta_ll']:7.3f} {r['ks_gaussian']:6.3f} {r['ks_laplace']:6.3f} {r['ks_gennorm']:6.3f}  "
              f"{r['best']}")
    if args.out:
        print(f"\nwrote {args.out}")
    return 0
