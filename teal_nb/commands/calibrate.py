"""`teal-nb calibrate`: C4 histograms of every hidden state of a model, and optionally a threshold table."""
from __future__ import annotations

from .common import add_model_args, emit, load

HELP = "record C4 activation histograms (cached) and optionally save a threshold table"


def add_arguments(p):
    add_model_args(p, sparsity=False)
    p.add_argument("--sequences", type=int, default=None, help="calibration windows (default: the preset's)")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="save the histograms here (safetensors + JSON metadata)")
    p.add_argument("--sparsity", type=float, default=None, help="also build a uniform threshold table")
    p.add_argument("--method", default="abs", choices=("abs", "signed"))
    p.add_argument("--no-refine", action="store_true")
    p.add_argument("--table", default=None, help="where to save the threshold table")


def run(args):
    from ..calibration import cached_histograms, refine_table
    from ..config import HIDDEN_STATES, check_sparsity
    from ..thresholds import table_from_hist

    if args.sparsity is not None:
        check_sparsity(args.sparsity)
    model, tok = load(args)
    hist = cached_histograms(model, tok, args.sequences, args.seq_len, args.seed, progress=not args.quiet)
    if args.out:
        hist.save(args.out)
    summary = {"model": hist.model, "layers": hist.n_layers, **hist.meta,
               "std_by_state": {s: [round(v, 4) for v in hist.moment("std")[:, i].tolist()]
                                for i, s in enumerate(HIDDEN_STATES)}}
    if args.sparsity is not None:
        table = table_from_hist(hist, args.sparsity, args.method, {"allocation": "uniform"})
        if not args.no_refine and args.sparsity > 0:
            table = refine_table(model, tok, table, progress=not args.quiet)
        if args.table:
            table.save(args.table)
        summary["thresholds_first_layer"] = table.values[0].tolist()
    emit(summary, False)
