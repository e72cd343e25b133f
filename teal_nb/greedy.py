"""Algorithm 1 of TEAL: block-wise greedy allocation of sparsity to the seven sites of each layer.

For one decoder layer, with its input taken from the dense model on calibration text:

    s = 0 for every site                                  (all dense)
    repeat until the effective sparsity reaches max_sparsity:
        for each site i: raise s_i by step_i = base_step * params_q / params_i, run the block,
                         measure the error of its output against the dense output
        (ours) one more candidate: every site at the next row's effective sparsity (uniform)
        accept the candidate with the smallest error; record (s, error, uniform's error)

Every accepted step skips `base_step * params_q` weights (the step is inversely proportional to
the site's size), so row k of a path sits at effective sparsity k * base_step * params_q / params_total
whichever sites were chosen, and paths of all layers share one grid of effective sparsities.

The uniform candidate (`uniform_candidate=True`, ours; TEAL's search has none). TEAL's path
moves one site at a time from dense, so nothing stops it from being worse than uniform sparsity
at the same effective sparsity, and on the embedded model it is, on the first rows of some
layers: one step on `k` alone is 0.3 of its range, while uniform spreads the same bytes over
seven sites, and at small sparsity spreading wins (the error of zeroing the smallest entries
grows faster than linearly in the sparsity). Ours puts the uniform point of the next row among
the candidates at every step; when it beats every single-site step, the state jumps there and
the search continues greedily from it (sites then step from a common base, s_i = p0 + n_i *
step_i). Every row is the best of a candidate set that contains uniform, so

    error[k] <= uniform_error[k]   for every row k of every layer,

by construction, not by luck of the data. Where TEAL's path is never worse than uniform, both
searches take the same path (by induction: the uniform candidate never wins a step). Uniform's
error is then measured at every row (it is a candidate), which TEAL does too (`baseline_every`
only thins that measurement in TEAL's mode); the cost is one full block run per row.

Choices, with TEAL's beside ours (`GreedyConfig`, `TEAL_DEFAULTS`):
- thresholds: from the dense model's calibration histograms (`calibration.cached_histograms`),
  exactly the thresholds `thresholds.table_for` later deploys. TEAL does the same (its
  `SparsifyFn` thresholds come from histograms of the dense activations); they are not recomputed
  as upstream sites become sparse, because at inference they are not either: the search measures
  the error of what will run. Ours are |x| quantiles (`method="abs"`), TEAL's the signed icdf.
- calibration text: ours C4 (as the paper says), 8 x 256 tokens for the embedded model; TEAL's
  released code uses 10 x 2048 tokens of Alpaca.
- error: relative MSE of the block output over the last 25% of positions (TEAL: the last 25%,
  with the L2 norm over positions averaged over (sequence, channel); `error="teal_l2"`).
- prefill: the last half of each calibration sequence is sparse, as in TEAL's search (its
  SparsifyFn sparsifies the last half of a prompt); the evaluated positions lie inside it.

Work: the layer's inputs are recorded in one dense forward; each layer's path is saved as soon as
it is complete, and a killed run resumes from the saved layers. Candidates reuse every stage
upstream of the site they change (`teal_nb.block.BlockRunner`), or, when cheaper, the previous
row's candidate of the same site (`greedy_layer`): the paths are the same bit for bit.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .allocation import RULES, Allocation, default_path, _safe
from .block import BlockRunner, block_error, sparse_range
from .config import HIDDEN_STATES, SITE_STATE, SITES, check_prefill, check_sparsity


@dataclass(frozen=True)
class GreedyConfig:
    """Parameters of the search. TEAL's values are in `TEAL_DEFAULTS`."""
    # Defaults sized for the embedded model on a 2-core CPU (search_flops: ~60 TFLOP); TEAL's beside.
    base_step: float = 0.1          # sparsity step of q; site i steps base_step * params_q / params_i (TEAL 0.05)
    max_sparsity: float = 0.8       # the paths end at this effective block sparsity (TEAL 0.9)
    last_fraction: float = 0.25     # the error is measured on this last fraction of positions (TEAL 0.25)
    prefill: str = "last_half"      # which calibration positions are sparse, "last_half" | "all" (TEAL last_half)
    sequences: int = 8              # calibration text: C4, `sequences` x `seq_len` tokens (TEAL 10 x 2048 Alpaca)
    seq_len: int = 256
    seed: int = 0
    method: str = "abs"             # threshold method, thresholds.METHODS (TEAL "signed")
    error: str = "rel_mse"          # block error, block.block_error (TEAL "teal_l2")
    baseline_every: int = 2         # without uniform_candidate: uniform's error every this many rows (TEAL 1)
    uniform_candidate: bool = True  # the uniform point is a candidate at every step (ours; TEAL False)

    def check(self) -> "GreedyConfig":
        if not 0 < self.base_step < 1:
            raise ValueError(f"base_step must be in (0, 1), got {self.base_step}")
        check_sparsity(self.max_sparsity, "max_sparsity")
        if not 0 < self.last_fraction <= 1:
            raise ValueError(f"last_fraction must be in (0, 1], got {self.last_fraction}")
        check_prefill(self.prefill)
        sparse_range(self.seq_len, self.prefill)  # "none" is refused: nothing would be sparse
        if self.prefill == "last_half" and self.last_fraction > 0.5:
            raise ValueError("with prefill='last_half' the evaluated positions must be sparse: "
                             f"last_fraction <= 0.5, got {self.last_fraction}")
        if self.sequences < 1 or self.seq_len < 4 or self.baseline_every < 1:
            raise ValueError("need sequences >= 1, seq_len >= 4, baseline_every >= 1")
        return self


# TEAL's released code (teal/greedyopt.py, teal/grab_acts.py), for comparison.
TEAL_DEFAULTS = {
    "base_step": 0.05, "max_sparsity": 0.9, "last_fraction": 0.25, "prefill": "last_half",
    "calibration": "Alpaca (tatsu-lab/alpaca), 10 x 2048 tokens", "method": "signed",
    "error": "teal_l2", "baseline_every": 1, "uniform_candidate": False,
}


def site_steps(params: dict[str, int], base_step: float) -> dict[str, float]:
    """Step of each site: inversely proportional to its parameter count, `base_step` for q."""
    return {s: base_step * params["q"] / params[s] for s in SITES}


def effective_step(params: dict[str, int], base_step: float) -> float:
    """Effective-sparsity increase of one accepted step (the same for every site)."""
    return base_step * params["q"] / sum(params[s] for s in SITES)


def n_rows(params: dict[str, int], cfg: GreedyConfig) -> int:
    """Steps to reach max_sparsity; refuses a maximum the step grid cannot reach below 1 per site."""
    steps, eff = site_steps(params, cfg.base_step), effective_step(params, cfg.base_step)
    k = math.ceil(cfg.max_sparsity / eff - 1e-9)
    reachable = sum(_max_count(steps[s]) for s in SITES)
    if k > reachable:
        raise ValueError(f"max_sparsity {cfg.max_sparsity} needs {k} steps; sites below sparsity 1 "
                         f"allow {reachable} (max effective {reachable * eff:.3f})")
    return k


def _max_count(step: float) -> int:
    """Most steps a site can take while its sparsity stays below 1."""
    return math.ceil(1 / step - 1e-9) - 1


class SiteThresholds:
    """Thresholds of one layer's sites at any sparsity, from calibration histograms (memoised)."""

    def __init__(self, hist, layer: int, method: str):
        from .activations import Histograms

        self.subs = {st: Histograms(hist.model, hist.counts[layer:layer + 1, i:i + 1],
                                    hist.moments[layer:layer + 1, i:i + 1])
                     for i, st in enumerate(HIDDEN_STATES)}
        self.method, self.cache = method, {}

    def __call__(self, site: str, p: float) -> float:
        from .thresholds import state_thresholds

        key = (site, round(p, 12))
        if key not in self.cache:
            t = state_thresholds(self.subs[SITE_STATE[site]], torch.tensor([[p]]), self.method)
            self.cache[key] = float(t[0, 0])
        return self.cache[key]


# How far down the block a site's stage lies: a change at a deeper site recomputes less.
_DEPTH = {"q": 0, "k": 0, "v": 0, "o": 1, "gate": 2, "up": 2, "down": 3}


def greedy_layer(runner: BlockRunner, target: torch.Tensor, thresholds: SiteThresholds,
                 params: dict[str, int], cfg: GreedyConfig, progress: bool = False, desc: str = ""):
    """One layer's path: (sparsity [K + 1, 7], error [K + 1], uniform_error [K + 1]).

    The state is a base sparsity `p0` shared by all sites plus `counts[s]` steps of each site:
    s_i = p0 + counts[i] * step_i. TEAL's search (`uniform_candidate=False`) keeps p0 = 0. Ours
    adds, at every step, the uniform point of the next row as an eighth candidate; when its error
    is lower than every single-site step, the state jumps there (p0 = that sparsity, counts = 0)
    and the search continues greedily from it. Each row is then the best of candidates that
    include uniform, so its error is never above uniform's at the same effective sparsity.
    """
    from tqdm.auto import tqdm

    steps, eff = site_steps(params, cfg.base_step), effective_step(params, cfg.base_step)
    K = n_rows(params, cfg)
    p0, counts = 0.0, dict.fromkeys(SITES, 0)

    def th(p0, c):
        return {s: thresholds(s, p0 + c[s] * steps[s]) for s in SITES}

    def can_step(s):  # the site stays below sparsity 1 after one more step
        return counts[s] + 1 <= math.ceil((1 - p0) / steps[s] - 1e-9) - 1

    state = runner.run(None, th(p0, counts))
    sparsity = torch.zeros(K + 1, len(SITES), dtype=torch.float64)
    error = torch.zeros(K + 1, dtype=torch.float64)
    uniform = torch.full((K + 1,), float("nan"), dtype=torch.float64)
    error[0] = uniform[0] = block_error(state["y"], target, cfg.error)
    # Candidate s of this row differs from candidate s of the previous row only at the site `a`
    # accepted there. When `a` lies downstream of s (e.g. a = down, s = q), starting from that
    # previous candidate recomputes less than starting from the accepted state: a step on q then
    # costs one down matmul instead of attention and the whole MLP. Same stages, same inputs: the
    # results are identical, the search about 30% cheaper on the embedded model.
    prev, accepted = {}, None
    for k in tqdm(range(1, K + 1), desc=desc or "greedy", disable=not progress, leave=False):
        best, cands = None, {}
        for s in SITES:
            if not can_step(s):
                continue
            cand = dict(counts)
            cand[s] += 1
            if accepted is not None and s in prev and _DEPTH[accepted] > _DEPTH[s]:
                st = runner.run(prev[s], th(p0, cand), accepted)
            else:
                st = runner.run(state, th(p0, cand), s)
            cands[s] = st
            e = block_error(st["y"], target, cfg.error)
            if best is None or e < best[0]:  # ties: the first site in SITES order
                best = (e, s, st)
        if cfg.uniform_candidate or k % cfg.baseline_every == 0 or k == K:
            p = k * eff
            uni = runner.run(None, {x: thresholds(x, p) for x in SITES}, memo=False)
            uniform[k] = block_error(uni["y"], target, cfg.error)
            if cfg.uniform_candidate and (best is None or uniform[k] < best[0]):
                best = (float(uniform[k]), None, uni)  # jump to the uniform point
        e, s, state = best
        if s is None:
            p0, counts = k * eff, dict.fromkeys(SITES, 0)
        else:
            counts[s] += 1
        prev, accepted = cands, s  # after a jump to uniform (s None) the candidates are not reused
        sparsity[k] = torch.tensor([p0 + counts[x] * steps[x] for x in SITES], dtype=torch.float64)
        error[k] = e
    return sparsity, error, uniform


def accepted_sites(sparsity: torch.Tensor) -> list:
    """The site each row of a path accepted (None for a jump to the uniform point), rows 1..K."""
    d = sparsity[1:].double() - sparsity[:-1].double()
    up = d > 1e-6
    return [SITES[int(r.nonzero())] if int(r.sum()) == 1 else None for r in up]


def search_flops(preset, cfg: GreedyConfig | None = None, paths: torch.Tensor | None = None) -> dict:
    """Matmul FLOPs of the search for a model shape (`config.Preset`) and settings.

    Counts what `BlockRunner` computes for each candidate of each row (q/k/v projections as if
    never memoised, the causal mask as if it saved nothing, every site a candidate), the uniform
    run of each row where it is measured, and the two full runs (dense target, start) of each
    layer. Norms, RoPE, SiLU, thresholding and the dense forward that records the layer inputs
    are left out: small next to the matmuls. Without `paths`: no candidate reuses the previous
    row's (an upper bound for any path). With `paths` (the [L, K + 1, 7] site sparsities the
    search took, e.g. `Allocation.sparsity`): the reuse `greedy_layer` makes along those paths.
    Used to turn a measured rate into an estimate for another model or machine.
    """
    cfg = (cfg or GreedyConfig()).check()
    B, T = cfg.sequences, cfg.seq_len
    Te = max(1, round(T * cfg.last_fraction))     # evaluated positions (compute_allocation)
    Ts = T - sparse_range(T, cfg.prefill)
    D, I, H, hd = preset.hidden, preset.intermediate, preset.n_heads, preset.head_dim
    kv = preset.n_kv_heads * hd

    def lin(tokens, n_out, n_in):
        return 2 * B * tokens * n_out * n_in

    P = {"q": lin(Te, D, D), "k": lin(Ts, kv, D), "v": lin(Ts, kv, D), "o": lin(Te, D, D),
         "gate": lin(Te, I, D), "up": lin(Te, I, D), "down": lin(Te, D, I)}
    attn = 2 * 2 * B * H * Te * T * hd                      # q k^T and p v over all T keys
    mlp = P["gate"] + P["up"] + P["down"]
    after_qkv = attn + P["o"] + mlp
    full = P["q"] + P["k"] + P["v"] + after_qkv
    # FLOPs of recomputing from a change at each site on.
    below = {"q": P["q"] + after_qkv, "k": P["k"] + after_qkv, "v": P["v"] + after_qkv,
             "o": P["o"] + mlp, "gate": P["gate"] + P["down"], "up": P["up"] + P["down"],
             "down": P["down"]}
    params = {s: preset.site_params(s) for s in SITES}
    K = n_rows(params, cfg)
    uniform_rows = K if cfg.uniform_candidate else len(
        {k for k in range(1, K + 1) if k % cfg.baseline_every == 0 or k == K})
    no_reuse = K * sum(below.values())
    if paths is None:
        per_layer = [no_reuse + uniform_rows * full + 2 * full] * preset.n_layers
    else:
        if paths.dim() == 2:
            paths = paths[None]
        if paths.shape[1] != K + 1:
            raise ValueError(f"paths have {paths.shape[1] - 1} rows, the settings {K}")
        per_layer = []
        for path in paths:
            prev, cand = None, 0
            for a in accepted_sites(path):
                cand += sum(below[prev] if prev is not None and _DEPTH[prev] > _DEPTH[s] else below[s]
                            for s in SITES)
                prev = a
            per_layer.append(cand + uniform_rows * full + 2 * full)
    return {"rows": K, "per_row_no_reuse": sum(below.values()), "full_run": full,
            "per_layer": per_layer, "total": sum(per_layer), "no_reuse_total":
            (no_reuse + uniform_rows * full + 2 * full) * len(per_layer)}


# ---------------------------------------------------------------------- the whole model

def _fingerprint(model_name: str, n_layers: int, cfg: GreedyConfig, hist_meta: dict) -> str:
    return json.dumps({"model": model_name, "layers": n_layers, "config": dataclasses.asdict(cfg),
                       "calibration": hist_meta}, sort_keys=True, default=str)


@torch.no_grad()
def layer_inputs(model: nn.Module, batches: torch.Tensor, layers: list[int]):
    """Dense inputs of the chosen decoder layers on `batches`, and the rotary cos/sin: one forward."""
    from .models import decoder_layers

    dec = decoder_layers(model)
    want, got, rope = set(layers), {}, {}

    def hook(i):
        def f(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            if i in want:
                got[i] = x.detach().clone()
            if "cos" not in rope and kwargs.get("position_embeddings") is not None:
                rope["cos"], rope["sin"] = kwargs["position_embeddings"]
            if i == max(want):
                raise _Enough
        return f

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(dec)]
    device = next(model.parameters()).device
    try:
        model(batches.to(device), use_cache=False)
    except _Enough:  # stop the forward at the last layer we need
        pass
    finally:
        for h in handles:
            h.remove()
    if "cos" not in rope:  # older transformers: position embeddings computed inside attention
        x = got[min(want)]
        pos = torch.arange(x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
        rope["cos"], rope["sin"] = model.model.rotary_emb(x, pos)
    return got, rope["cos"], rope["sin"]


class _Enough(Exception):
    pass


def layer_path(model: nn.Module, layer: int, hist, batches: torch.Tensor, cfg: GreedyConfig | None = None,
               progress: bool = False):
    """Algorithm 1 on one layer, as `compute_allocation` runs it: (sparsity, error, uniform_error)."""
    from .models import decoder_layers, model_sites, site_params

    cfg = (cfg or GreedyConfig()).check()
    inputs, cos, sin = layer_inputs(model, batches, [layer])
    T = batches.shape[1]
    runner = BlockRunner(decoder_layers(model)[layer], model_sites(model)[layer], inputs[layer], cos, sin,
                         sparse_range(T, cfg.prefill), T - max(1, round(T * cfg.last_fraction)))
    target = runner.run(None, {s: -1.0 for s in SITES})["y"]
    return greedy_layer(runner, target, SiteThresholds(hist, layer, cfg.method), site_params(model), cfg,
                        progress=progress, desc=f"layer {layer}")


def compute_allocation(model: nn.Module, tok=None, cfg: GreedyConfig | None = None,
                       out: str | Path | None = None, hist=None, batches: torch.Tensor | None = None,
                       progress: bool = True, callback=None) -> Allocation:
    """Algorithm 1 on every layer of `model`; saved to `out` (default: `allocation.default_path`).

    Each finished layer is written to `<out>.partial/`; a later call with the same model and
    settings picks those up and computes only the missing layers. `hist`: calibration
    histograms (default: the cached C4 ones that `thresholds.table_for` uses); `batches`:
    calibration token windows (default: C4, `cfg.sequences` x `cfg.seq_len`, `cfg.seed`).
    `callback(layer)` runs after each layer is saved.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from .activations import _atomic
    from .models import decoder_layers, model_id, model_sites, site_params
    from .results import provenance

    cfg = (cfg or GreedyConfig()).check()
    name = model_id(model)
    sites, params = model_sites(model), site_params(model)
    L = len(sites)
    if hist is None:
        from .calibration import cached_histograms
        hist = cached_histograms(model, tok, progress=progress)
    from .activations import check_model
    check_model(hist.model, hist.n_layers, model, "calibration histograms")
    if batches is None:
        from .data import c4_calibration
        batches = c4_calibration(tok, cfg.sequences, cfg.seq_len, cfg.seed)
    if tuple(batches.shape) != (cfg.sequences, cfg.seq_len):
        raise ValueError(f"batches {tuple(batches.shape)} do not match the config "
                         f"({cfg.sequences} x {cfg.seq_len})")
    out = Path(out) if out is not None else default_path(model)
    partial = Path(str(out) + ".partial")
    fp = _fingerprint(name, L, cfg, hist.meta)

    done: dict[int, tuple] = {}
    if partial.is_dir():
        for f in sorted(partial.glob("layer-*.safetensors")):
            with safe_open(str(f), "pt") as g:
                m = g.metadata() or {}
                if m.get("fingerprint") != fp:
                    continue  # another model or other settings: recomputed below
                done[int(m["layer"])] = (g.get_tensor("sparsity"), g.get_tensor("error"),
                                         g.get_tensor("uniform_error"), float(m["seconds"]),
                                         float(m.get("cpu_seconds", "nan")))
    todo = [i for i in range(L) if i not in done]
    t_start, c_start = time.perf_counter(), time.process_time()
    if todo:
        inputs, cos, sin = layer_inputs(model, batches, todo)
        t_inputs, c_inputs = time.perf_counter() - t_start, time.process_time() - c_start
        T = cfg.seq_len
        s0, e0 = sparse_range(T, cfg.prefill), T - max(1, round(T * cfg.last_fraction))
        bar = tqdm(todo, desc="greedy layers", disable=not progress)
        for i in bar:
            t0, c0 = time.perf_counter(), time.process_time()
            layer = decoder_layers(model)[i]
            runner = BlockRunner(layer, sites[i], inputs.pop(i), cos, sin, s0, e0)
            target = runner.run(None, {s: -1.0 for s in SITES})["y"]  # dense output
            path = greedy_layer(runner, target, SiteThresholds(hist, i, cfg.method), params, cfg,
                                progress=progress, desc=f"layer {i}")
            seconds = time.perf_counter() - t0 + (t_inputs if i == todo[0] else 0.0)
            cpu = time.process_time() - c0 + (c_inputs if i == todo[0] else 0.0)
            done[i] = (*path, seconds, cpu)
            tensors = {"sparsity": path[0], "error": path[1], "uniform_error": path[2]}
            _atomic(partial / f"layer-{i:03d}.safetensors", lambda tmp: save_file(
                tensors, tmp, metadata={"fingerprint": fp, "layer": str(i), "seconds": repr(seconds),
                                       "cpu_seconds": repr(cpu)}))
            bar.set_postfix(err=f"{float(path[1][-1]):.3g}", uniform=f"{float(path[2][-1]):.3g}")
            del runner
            if callback is not None:
                callback(i)
    K = done[0][0].shape[0] - 1
    eff = effective_step(params, cfg.base_step)
    seconds = [done[i][3] for i in range(L)]
    alloc = Allocation(
        model=name,
        sparsity=torch.stack([done[i][0] for i in range(L)]).float(),
        error=torch.stack([done[i][1] for i in range(L)]),
        uniform_error=torch.stack([done[i][2] for i in range(L)]),
        effective=torch.arange(K + 1, dtype=torch.float64) * eff,
        params=params, config=dataclasses.asdict(cfg),
        meta={"calibration": {"data": "c4" if tok is not None else "given", "sequences": cfg.sequences,
                              "seq_len": cfg.seq_len, "seed": cfg.seed},
              "histograms": hist.meta, "teal_defaults": TEAL_DEFAULTS,
              # Wall time depends on what else runs on the machine; CPU time (all threads) much less.
              "seconds_total": sum(seconds), "seconds_per_layer": seconds,
              "cpu_seconds_total": sum(done[i][4] for i in range(L)),
              "resumed_layers": L - len(todo), "provenance": provenance("teal_nb.greedy.compute_allocation")})
    alloc.save(out)
    shutil.rmtree(partial, ignore_errors=True)
    return alloc


# ---------------------------------------------------------------------- the bridge to thresholds

def find_allocation(model: nn.Module | str) -> Path:
    """The saved allocation of a model: data/allocations/ of the source tree, else the cache."""
    from .models import cache_dir, model_id

    name = _safe(model if isinstance(model, str) else model_id(model)) + ".safetensors"
    first = default_path(model)
    for p in (first, cache_dir() / "allocations" / name):
        if p.exists():
            return p
    raise FileNotFoundError(f"no greedy allocation for {name[:-12]!r} (looked in {first.parent} and "
                            f"{cache_dir() / 'allocations'}): compute one with `teal-nb allocate`")


def allocation_sparsities(model: nn.Module, allocation: str, sparsity: float) -> torch.Tensor:
    """Per-(layer, site) sparsities [L, 7] of an allocation at a model-wide target sparsity.

    `allocation`: "greedy" (TEAL's rule on the model's saved allocation), "global" (the
    cross-layer rule), a path to a saved allocation (TEAL's rule), or "greedy:<path>" /
    "global:<path>".
    """
    rule, _, path = allocation.partition(":") if allocation.startswith(tuple(f"{r}:" for r in RULES)) \
        else (allocation, "", "")
    if rule not in RULES:
        rule, path = "greedy", allocation
    alloc = Allocation.load(path or find_allocation(model), model)
    return alloc.site_sparsities(sparsity, rule)


__all__ = ["GreedyConfig", "TEAL_DEFAULTS", "greedy_layer", "search_flops", "accepted_sites", "compute_allocation", "allocation_sparsities",
           "site_steps", "effective_step", "find_allocation", "layer_inputs", "layer_path"]
