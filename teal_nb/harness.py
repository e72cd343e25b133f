"""The lm-evaluation-harness bridge: run harness tasks on an in-memory (sparsified) model.

    from teal_nb.harness import evaluate_tasks
    res = evaluate_tasks(model, tok, ["piqa", "arc_easy"], table=table, prefill="last_half", limit=500)
    res["tasks"]["piqa"]["metrics"]["acc"], res["tasks"]["piqa"]["metrics"]["acc_stderr"]

The model is wrapped with the harness's own `HFLM`; the tasks are the harness's own configs
(offline: with documents redirected to $TEAL_DATA_DIR, see `teal_nb.tasks`; online: the
built-in tasks by name). Each task runs on its own, so that its CPU time and the realized
sparsity during it are measured separately.

The prefill protocol is part of every evaluation, because it decides what is sparse:
  - log-likelihood tasks (multiple choice, LAMBADA) are prefill only: the harness scores a
    continuation in one forward pass over context + continuation. With `none`, nothing is
    sparse and the result carries a warning; with `last_half` (TEAL's evaluations) the last
    half of each request's tokens is sparse; with `all`, every token is.
  - generation tasks (GSM8K) prefill the prompt under the protocol, then every decoded token
    is sparse (TEAL's target setting).
With `last_half` the harness's right-padded log-likelihood batches are sparsified row by row:
"the last half" of a padded row is not the last half of its request, so the bridge hands each
row's true length to the sparsified model before every batched forward (`_row_lengths`), and
generation tasks (left-padded prompts) run one request at a time.

`lm_eval` is imported lazily: the package imports (and runs its GPU paths) without it.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import time
from contextlib import nullcontext

import torch
from torch import nn

from .config import SITES, check_prefill

LOGLIKELIHOOD_TYPES = ("loglikelihood", "multiple_choice", "loglikelihood_rolling")
NOT_SPARSE_WARNING = ("prefill protocol 'none' on a log-likelihood task: these tasks are prefill-only, "
                      "so nothing was sparsified and the score is the dense model's")


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise ImportError("the lm-eval bridge needs lm-evaluation-harness: pip install 'lm-eval[hf]' "
                          "(or the `eval` extra of teal_nb)") from e


def _quiet(verbose: bool) -> None:
    if verbose:
        return
    for name in ("lm_eval", "lm-eval", "lm_eval.api.task", "lm_eval.evaluator", "lm_eval.models.huggingface"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass


def wrap(model: nn.Module, tok, batch_size: int = 1, max_length: int | None = None):
    """The harness's HFLM around an in-memory model (sparsified or not: the swap is in place)."""
    _require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    kwargs = {} if max_length is None else {"max_length": max_length}
    return HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, **kwargs)


def _metrics(task_result: dict) -> dict:
    """{'acc': .., 'acc_stderr': ..} from the harness's 'acc,none' / 'acc_stderr,none' keys (filters kept)."""
    out = {}
    for key, value in task_result.items():
        if "," not in key or key.startswith("alias"):
            continue
        metric, filt = key.split(",", 1)
        name = metric if filt == "none" else f"{metric}[{filt}]"
        if isinstance(value, str):  # the harness writes "N/A" for a stderr it did not compute
            value = float("nan")
        out[name] = float(value)
    return out


def _realized(sp) -> dict:
    """Mean realized sparsity per site over the sparsified tokens of the last task."""
    if sp is None:
        return {}
    r = sp.realized()
    out = {s: float(r[:, j].nanmean()) for j, s in enumerate(SITES)}
    out = {k: (None if math.isnan(v) else round(v, 4)) for k, v in out.items()}
    seen = sp.stats[..., 1].sum().item()
    out["all"] = round(float(sp.stats[..., 0].sum().item() / seen), 4) if seen else None
    out["entries_seen"] = int(seen)
    return out


def evaluate_tasks(model: nn.Module, tok, tasks: list[str], *, table=None, prefill: str = "last_half",
                   limit: int | float | None = None, num_fewshot: int | None = None,
                   batch_size: int = 1, max_gen_toks: int | None = None, seed: int = 0,
                   offline: bool | None = None, log_samples: bool = False, verbose: bool = False,
                   progress: bool = True, bootstrap_iters: int = 1000, docs: tuple[int, int] | None = None) -> dict:
    """Run harness tasks on `model`, sparsified with `table` (None: dense) under a prefill protocol.

    Returns {"prefill", "sparse", "batch_size", "limit", "tasks": {name: {...}}, "warnings": [...]}
    where each task has its metrics (accuracy and standard error as the harness computes them),
    sample count, output type, CPU and wall time, the realized sparsity per site, and where its
    documents came from. `docs=(start, stop)` scores documents start..stop-1 of every task instead
    of the first `limit` (to split one long evaluation over several processes).
    """
    _require_lm_eval()
    check_prefill(prefill)
    from lm_eval import simple_evaluate

    _quiet(verbose)
    # progress=False: the harness's own tqdm bars (which it gives no switch for) go nowhere
    quiet = contextlib.redirect_stderr(io.StringIO()) if not progress else nullcontext()
    with quiet:
        return _evaluate(model, tok, tasks, table, prefill, limit, num_fewshot, batch_size, max_gen_toks,
                         seed, offline, log_samples, verbose, bootstrap_iters, simple_evaluate, docs)


def _evaluate(model, tok, tasks, table, prefill, limit, num_fewshot, batch_size, max_gen_toks, seed, offline,
              log_samples, verbose, bootstrap_iters, simple_evaluate, docs=None) -> dict:
    from .sparsify import sparsify
    from .tasks import is_offline, task_manager, task_specs

    offline = is_offline() if offline is None else offline
    lm = wrap(model, tok, batch_size=batch_size)
    tm = task_manager(offline)
    gen_kwargs = None if max_gen_toks is None else {"max_gen_toks": int(max_gen_toks)}
    out = {"prefill": prefill, "sparse": table is not None, "batch_size": batch_size, "limit": limit,
           "num_fewshot": num_fewshot, "seed": seed, "docs": list(docs) if docs else None, "data": "offline" if offline else "hub",
           "tasks": {}, "groups": {}, "warnings": []}
    if table is not None and prefill == "none":
        out["note"] = "prefill 'none': prompts are dense; only decoded tokens (generation tasks) are sparse"
    for name, spec in zip(tasks, task_specs(list(tasks), offline)):
        ctx = sparsify(model, table, prefill=prefill) if table is not None else nullcontext()
        with ctx as sp, (_row_lengths(sp, lm) if sp is not None and prefill == "last_half" else nullcontext()):
            cpu0, wall0 = time.process_time(), time.perf_counter()
            picked = None
            if docs is not None:
                if limit is not None:
                    raise ValueError("give either limit or docs, not both")
                picked = {name: list(range(int(docs[0]), int(docs[1])))}
            res = simple_evaluate(model=lm, tasks=[spec], num_fewshot=num_fewshot, limit=limit, samples=picked,
                                  task_manager=tm, log_samples=log_samples, bootstrap_iters=bootstrap_iters,
                                  gen_kwargs=gen_kwargs, random_seed=seed, numpy_random_seed=seed,
                                  torch_random_seed=seed, fewshot_random_seed=seed,
                                  verbosity="ERROR" if not verbose else None)
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            realized = _realized(sp)
        for tname, tres in res["results"].items():
            if tname in res.get("groups", {}):
                out["groups"][tname] = {"metrics": _metrics(tres)}
                continue
            cfg = res["configs"].get(tname, {})
            otype = cfg.get("output_type")
            n = res.get("n-samples", {}).get(tname, {})
            entry = {"metrics": _metrics(tres), "samples": n.get("effective"), "split_size": n.get("original"),
                     "output_type": otype, "num_fewshot": res.get("n-shot", {}).get(tname),
                     "source": (cfg.get("metadata") or {}).get("teal_offline", {}).get("files")
                     if offline else cfg.get("dataset_path"),
                     "cpu_s": round(cpu, 2), "wall_s": round(wall, 2), "realized_sparsity": realized,
                     "sparse": table is not None and not (prefill == "none" and otype in LOGLIKELIHOOD_TYPES)}
            if table is not None and prefill == "none" and otype in LOGLIKELIHOOD_TYPES:
                entry["warning"] = NOT_SPARSE_WARNING
                out["warnings"].append(f"{tname}: {NOT_SPARSE_WARNING}")
            if log_samples:
                entry["log_samples"] = res.get("samples", {}).get(tname, [])
            if len(res["results"]) > 1:  # a group: the time is the group's, shared by its members
                entry["time_is_group_total"] = name
            out["tasks"][tname] = entry
    return out


@contextlib.contextmanager
def _row_lengths(sp, lm):
    """Per-row `last_half` in the harness's batches: log-likelihood batches are right-padded by
    `pad_and_concat`, which sees each request's true length; hand those lengths to the sparsified
    model. Generation (left-padded prompts) runs one request at a time. Any other batched forward
    raises (strict) instead of sparsifying the wrong positions."""
    import lm_eval.models.huggingface as hf

    original = hf.pad_and_concat

    def pad_and_concat(max_length, tensors, padding_side="right"):
        lengths = [t.shape[-1] for t in tensors]  # before the call: it pads `tensors` in place
        out = original(max_length, tensors, padding_side=padding_side)
        if padding_side == "right":
            sp.set_row_lengths(lengths, out.shape[-1])
        return out

    def generate_until(requests, *args, **kwargs):
        saved = lm.batch_size_per_gpu
        lm.batch_size_per_gpu = 1
        try:
            return type(lm).generate_until(lm, requests, *args, **kwargs)
        finally:
            lm.batch_size_per_gpu = saved

    sp.set_row_lengths(None, strict=True)
    hf.pad_and_concat, lm.generate_until = pad_and_concat, generate_until
    try:
        yield
    finally:
        hf.pad_and_concat = original
        del lm.generate_until
        sp.set_row_lengths(None, strict=False)


def loglikelihoods(result: dict, task: str) -> list[list[float]]:
    """Per-document log-likelihood of each choice, from a result run with `log_samples=True`."""
    rows = sorted(result["tasks"][task]["log_samples"], key=lambda s: s["doc_id"])
    return [[float(r[0]) for r in row["filtered_resps"]] for row in rows]


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(int(n))
        os.environ.setdefault("OMP_NUM_THREADS", str(n))


__all__ = ["evaluate_tasks", "wrap", "loglikelihoods", "NOT_SPARSE_WARNING"]
