"""Arguments and steps that several commands share."""
from __future__ import annotations

import json
import sys

from ..config import DEFAULT_PRESET, PREFILL_PROTOCOLS, SITES


def add_model_args(p, sparsity: bool = True) -> None:
    p.add_argument("--model", default=DEFAULT_PRESET, help="preset name, HF id or local folder")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the preset's)")
    p.add_argument("--device", default="cpu")
    if sparsity:
        p.add_argument("--sparsity", type=float, default=0.0, help="model-wide target sparsity in [0, 1)")
        p.add_argument("--allocation", default="uniform",
                       help="uniform | greedy | global | path of a saved allocation")
        p.add_argument("--prefill", default="last_half", choices=PREFILL_PROTOCOLS,
                       help="which prompt tokens are sparse (decode steps always are)")
        p.add_argument("--method", default="abs", choices=("abs", "signed"),
                       help="threshold from the |x| quantile (abs) or TEAL's signed icdf(0.5 + p/2)")
        p.add_argument("--no-refine", action="store_true",
                       help="dense-model thresholds as TEAL (default: refined on the sparsified model)")
        p.add_argument("--thresholds", default=None, help="a saved ThresholdTable instead of calibrating")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def load(args):
    from ..config import check_sparsity
    from ..models import load_model

    if hasattr(args, "sparsity"):
        check_sparsity(args.sparsity)  # fail before loading anything
    if args.quiet:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    return load_model(args.model, args.dtype, args.device)


def thresholds(args, model, tok):
    """The ThresholdTable the arguments ask for, or None for the dense model."""
    from ..thresholds import ThresholdTable, table_for

    if args.thresholds:
        return ThresholdTable.load(args.thresholds, model)
    if args.sparsity == 0 and args.allocation == "uniform":
        return None
    return table_for(model, tok, args.sparsity, args.allocation, args.method,
                     refine=not args.no_refine, progress=not args.quiet)


def realized_by_site(realized) -> dict:
    """Mean realized sparsity of each site over the layers (NaN-free: layers never sparsified skipped)."""
    import torch

    out = {}
    for j, s in enumerate(SITES):
        col = realized[:, j]
        col = col[~torch.isnan(col)]
        out[s] = round(col.mean().item(), 4) if col.numel() else None
    return out


def emit(obj: dict, as_json: bool, out: str | None = None) -> None:
    text = json.dumps(obj, indent=None if as_json else 1, default=float)
    if out:
        from ..results import write_json
        write_json(out, obj)
    if as_json:
        print(text)
    else:
        sys.stdout.write(text + "\n")
