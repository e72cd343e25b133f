"""`teal-nb lm-eval`: downstream accuracy of a (sparsified) model through lm-evaluation-harness."""
from __future__ import annotations

HELP = ("accuracy on lm-evaluation-harness tasks (offline from TEAL_DATA_DIR, else the hub), "
        "dense or sparsified, with the prefill protocol stated")


def add_arguments(p) -> None:
    p.add_argument("--model", default="smollm2-135m", help="preset name, HF id or local folder")
    p.add_argument("--tasks", default="piqa,arc_easy",
                   help="comma-separated harness task names (offline: piqa, arc_easy, arc_challenge, "
                        "hellaswag, winogrande, boolq, gsm8k, lambada_openai, mmlu, mmlu_<subject>)")
    p.add_argument("--limit", type=float, default=None,
                   help="documents per task: the first N (N >= 1) or a fraction (< 1); default: the whole split")
    p.add_argument("--docs", default=None, metavar="START:STOP",
                   help="score documents START..STOP-1 of each task instead of --limit (to split a run)")
    p.add_argument("--chunk", type=int, default=None, metavar="N",
                   help="evaluate N documents of every task at a time and rewrite --out after each round, "
                        "so an interrupted run keeps what it measured (0/1 metrics merge exactly)")
    p.add_argument("--sparsity", type=float, default=0.0, help="target model-wide sparsity; 0 = dense")
    p.add_argument("--allocation", default="uniform", choices=("uniform", "greedy", "global"),
                   help="how the sparsity is spread over layers and sites")
    p.add_argument("--method", default="abs", choices=("abs", "signed"),
                   help="threshold from the |x| quantile (ours) or TEAL's signed icdf(0.5 + p/2)")
    p.add_argument("--no-refine", dest="refine", action="store_false",
                   help="TEAL's dense-model thresholds (default: re-derived on the sparsified model, "
                        "see teal_nb.calibration.refine_table)")
    p.add_argument("--prefill", default="last_half", choices=("none", "last_half", "all"),
                   help="which prompt tokens are sparse (TEAL's evaluations: last_half); log-likelihood "
                        "tasks are prefill-only, so with `none` nothing is sparse")
    p.add_argument("--num-fewshot", type=int, default=None, help="default: each task's own")
    p.add_argument("--batch-size", type=int, default=1,
                   help="harness batch size (sparse last_half: each padded row is sparsified over its own last "
                        "half; generation runs one request at a time)")
    p.add_argument("--max-gen-toks", type=int, default=None, help="generation tasks: cap on new tokens")
    p.add_argument("--ppl-samples", type=int, default=0,
                   help="also WikiText-2 perplexity on this many samples (the preset's protocol); 0 = skip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, help="default: the preset's")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    p.add_argument("--verbose", action="store_true", help="the harness's own logging")


def _limit(x):
    if x is None:
        return None
    return int(x) if x >= 1 else float(x)


def run(args) -> int:
    import json
    import time

    import torch

    from ..config import check_sparsity, get_preset
    from ..harness import evaluate_tasks, set_threads
    from ..models import load_model, model_id
    from ..results import provenance, write_json

    set_threads(args.threads)
    sparsity = check_sparsity(args.sparsity)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks is empty")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cpu0, wall0 = time.process_time(), time.perf_counter()
    prov = provenance()  # at the start: the code that ran, not the tree at the end
    model, tok = load_model(args.model, dtype=args.dtype, device=device)

    table = None
    if sparsity > 0:
        from ..thresholds import table_for

        table = table_for(model, tok, sparsity, allocation=args.allocation, method=args.method,
                          refine=args.refine, progress=not args.json)
    record = {
        "kind": "lm-eval",
        "model": model_id(model),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "sparsity": sparsity,
        "allocation": args.allocation if table is not None else "dense",
        "method": args.method if table is not None else None,
        "prefill": args.prefill,
        "limit": _limit(args.limit),
    }
    try:
        record["hf_id"] = get_preset(args.model).hf_id
    except KeyError:
        pass
    if table is not None and args.allocation != "uniform":
        record["allocation_file"] = _allocation_provenance(model, args.allocation)
    if table is not None:
        record["thresholds"] = {"meta": table.meta,
                                "mean_target_sparsity_per_site": dict(zip(
                                    ("q", "k", "v", "o", "gate", "up", "down"),
                                    [round(float(v), 4) for v in table.sparsity.mean(0)]))}
    docs = tuple(int(x) for x in args.docs.split(":")) if args.docs else None
    common = dict(table=table, prefill=args.prefill, num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                  max_gen_toks=args.max_gen_toks, seed=args.seed, verbose=args.verbose)
    if not args.chunk:
        res = evaluate_tasks(model, tok, tasks, limit=_limit(args.limit), docs=docs, **common)
    else:
        if not args.out:
            raise ValueError("--chunk needs --out (the file it rewrites after every round)")
        start, stop = docs or (0, int(args.limit or 0))
        if stop <= start:
            raise ValueError("--chunk needs --docs START:STOP or an integer --limit")
        parts = {t: [] for t in tasks}
        for a in range(start, stop, args.chunk):
            b = min(a + args.chunk, stop)
            for t in tasks:
                res = evaluate_tasks(model, tok, [t], docs=(a, b), **common)
                parts[t].extend(res["tasks"].values())
            res["tasks"] = {t: _merge(entries) for t, entries in parts.items()}
            res["docs"] = [start, b]
            record.update({k: res[k] for k in ("batch_size", "num_fewshot", "seed", "docs", "data", "tasks")})
            record.update(chunk=args.chunk, complete=b >= stop, total_cpu_s=round(time.process_time() - cpu0, 2),
                          total_wall_s=round(time.perf_counter() - wall0, 2), versions=_versions(),
                          provenance=prov)
            write_json(args.out, record)
        res["warnings"] = sorted({f"{t}: {e['warning']}" for t, es in parts.items() for e in es if "warning" in e})
    record.update({k: res[k] for k in ("batch_size", "num_fewshot", "seed", "docs", "data", "tasks", "groups",
                                       "warnings") if k in res})
    if "note" in res:
        record["note"] = res["note"]
    if args.ppl_samples:
        from contextlib import nullcontext

        from ..evaluate import perplexity
        from ..sparsify import sparsify

        p = get_preset(record["model"]) if record["model"] in _preset_names() else None
        seq_len, eval_len = (p.ppl_seq_len, p.ppl_eval_len) if p else (2048, 512)
        c0, w0 = time.process_time(), time.perf_counter()
        ctx = sparsify(model, table, prefill=args.prefill) if table is not None else nullcontext()
        with ctx:
            ppl = perplexity(model, tok, samples=args.ppl_samples, seq_len=seq_len, eval_len=eval_len,
                             seed=args.seed, progress=not args.json)
        ppl.pop("sample_nll", None)
        ppl.update(cpu_s=round(time.process_time() - c0, 2), wall_s=round(time.perf_counter() - w0, 2),
                   prefill=args.prefill)
        record["perplexity"] = ppl
    record["total_cpu_s"] = round(time.process_time() - cpu0, 2)
    record["total_wall_s"] = round(time.perf_counter() - wall0, 2)
    record["versions"] = _versions()
    record["provenance"] = prov
    if args.out:
        write_json(args.out, record)
    if args.json:
        print(json.dumps(record, indent=1, default=float))
    else:
        _print_table(record)
    return 0


BINARY = ("acc", "acc_norm", "exact_match")  # per-document 0/1 scores: their means merge exactly


def _merge(entries: list[dict]) -> dict:
    """One task's result from results on disjoint document ranges (0/1 metrics; others dropped)."""
    import math

    n = sum(e["samples"] for e in entries)
    metrics = {}
    for key in entries[0]["metrics"]:
        base, _, filt = key.partition("[")
        if base not in BINARY:
            continue
        v = sum(e["metrics"][key] * e["samples"] for e in entries) / n
        metrics[key] = v
        # the harness's standard error of a mean: sample std (ddof 1) / sqrt(n)
        metrics[base + "_stderr" + (f"[{filt}" if filt else "")] = math.sqrt(v * (1 - v) / (n - 1)) if n > 1 else float("nan")
    out = {k: entries[0][k] for k in ("split_size", "output_type", "num_fewshot", "source", "sparse")}
    seen = sum((e["realized_sparsity"] or {}).get("entries_seen", 0) for e in entries)
    realized = {}
    if seen:
        for site in ("q", "k", "v", "o", "gate", "up", "down", "all"):
            realized[site] = round(sum((e["realized_sparsity"][site] or 0) * e["realized_sparsity"]["entries_seen"]
                                       for e in entries) / seen, 4)
        realized["entries_seen"] = seen
    out.update(metrics=metrics, samples=n, cpu_s=round(sum(e["cpu_s"] for e in entries), 2),
               wall_s=round(sum(e["wall_s"] for e in entries), 2), realized_sparsity=realized,
               chunks=len(entries))
    if any("warning" in e for e in entries):
        out["warning"] = entries[0].get("warning")
    return out


def _allocation_provenance(model, allocation: str) -> dict:
    """Which saved allocation a greedy/global run used: path, sha256 of its files, last commit."""
    import hashlib
    import subprocess
    from pathlib import Path

    from ..greedy import find_allocation

    path = Path(allocation.partition(":")[2] or (allocation if allocation not in ("greedy", "global")
                                                 else find_allocation(model)))
    out = {"path": str(path)}
    for f in (path, path.with_suffix(".json")):
        if f.exists():
            out[f"sha256_{f.suffix[1:]}"] = hashlib.sha256(f.read_bytes()).hexdigest()
    try:
        out["git_commit"] = subprocess.run(["git", "log", "-1", "--format=%H", "--", str(path)], cwd=path.parent,
                                           capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def _preset_names():
    from ..config import PRESETS

    return PRESETS


def _versions() -> dict:
    out = {}
    for mod in ("lm_eval", "datasets"):
        try:
            from importlib.metadata import version

            out[mod] = version(mod.replace("_", "-") if mod == "lm_eval" else mod)
        except Exception:  # noqa: BLE001 - a missing distribution is not an error here
            out[mod] = None
    return out


def _print_table(r: dict) -> None:
    head = (f"{r['model']}  sparsity={r['sparsity']} ({r['allocation']})  prefill={r['prefill']}  "
            f"limit={r['limit']}")
    print(head)
    for name, t in r["tasks"].items():
        m = t["metrics"]
        main = next((k for k in ("acc", "exact_match[strict-match]", "acc_norm") if k in m), next(iter(m), None))
        se = m.get(main.split("[")[0] + "_stderr" + (main[len(main.split('[')[0]):] if "[" in main else ""))
        print(f"  {name:<16} {main}={m.get(main, float('nan')):.4f} +- {se if se is None else round(se, 4)}  "
              f"n={t['samples']}  cpu={t['cpu_s']}s")
    for w in r["warnings"]:
        print("  warning:", w)
    if "perplexity" in r:
        print(f"  wikitext-2 ppl={r['perplexity']['ppl']:.3f}")
