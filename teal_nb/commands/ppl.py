"""`teal-nb ppl`: WikiText-2 perplexity of a model, dense or sparsified, as one JSON object."""
from __future__ import annotations

from .common import add_model_args, emit, load, realized_by_site, thresholds

HELP = "WikiText-2 perplexity (TEAL's protocol), dense or sparsified"


def add_arguments(p):
    add_model_args(p)
    p.add_argument("--samples", type=int, default=None, help="random windows (default: the preset's; paper 128)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per window (paper 2048)")
    p.add_argument("--eval-len", type=int, default=None, help="scored tokens at the end of each window (paper 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="test", choices=("test", "validation"))
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--out", default=None, help="also write the JSON here")


def run(args):
    from ..config import SITES, get_preset
    from ..evaluate import perplexity
    from ..models import model_id
    from ..results import provenance
    from ..sparsify import sparsify

    model, tok = load(args)
    try:
        preset = get_preset(model_id(model))
        defaults = (preset.ppl_samples, preset.ppl_seq_len, preset.ppl_eval_len)
    except KeyError:
        defaults = (128, 2048, 512)
    samples, seq_len, eval_len = (a or d for a, d in zip((args.samples, args.seq_len, args.eval_len), defaults))
    table = thresholds(args, model, tok)
    kwargs = dict(samples=samples, seq_len=seq_len, eval_len=eval_len, seed=args.seed, split=args.split,
                  progress=not args.quiet)
    if table is None:
        result, realized = perplexity(model, tok, **kwargs), None
    else:
        with sparsify(model, table, prefill=args.prefill) as sp:
            result = perplexity(model, tok, **kwargs)
            realized = sp.realized()
    # Per-sample mean NLL stays in the record: differences between configurations on the same
    # samples are paired, and their spread is the noise of the comparison.
    result["sample_nll"] = [round(x, 6) for x in result["sample_nll"]]
    result["protocol"]["prefill"] = args.prefill
    result.update(
        model=model_id(model), sparsity=args.sparsity, allocation=args.allocation,
        prefill=args.prefill, threshold_method=args.method, refined=table is not None and not args.no_refine,
        realized_sparsity=realized_by_site(realized) if realized is not None else {s: 0.0 for s in
                                                                                  SITES},
        realized_sparsity_per_layer=realized.tolist() if realized is not None else None,
        provenance=provenance())
    emit(result, args.json, args.out)
