"""Thresholds calibrated on a decoder's own decode steps, and non-uniform allocations for speed runs.

For speed measurements on random weights there is no text distribution to calibrate on: the
thresholds come from the hidden states of the decode steps themselves. TEAL's own speed runs did
the same and missed at o_proj (0.25-0.33 realized where 0.4-0.5 was asked): the input of o_proj
is an attention-weighted mean of value vectors whose spread shrinks as the context grows, so a
threshold taken from one position does not hold at another, and sparsifying earlier sites moves
the distributions of later ones. Here thresholds are the exact |x| quantiles over every decode
step of a run (pooled across positions), re-taken on the sparse run until they settle (a fixed
point: each pass sees the distributions that the previous pass's thresholds produce).
"""
from __future__ import annotations

import torch

from .config import HIDDEN_STATES, SITE_STATE, SITES


@torch.no_grad()
def record_decode_inputs(dec, prompt: torch.Tensor, new_tokens: int, forced=None, out: dict | None = None) -> dict:
    """|x| of every site input on every decode step: {(layer, state): fp32 [steps * B, K]}.
    `out` (a dict) receives the generated ids under "ids"."""
    dec.record = {}
    try:
        ids, _ = dec.generate(prompt, new_tokens, forced=forced)
        rec = {k: torch.cat(v).abs() for k, v in dec.record.items()}
    finally:
        dec.record = None
    if out is not None:
        out["ids"] = ids
    return rec


def quantile_thresholds(records: dict, sparsity: torch.Tensor) -> torch.Tensor:
    """Per-(layer, site) thresholds [L, 7] that zero exactly a fraction sparsity[l, s] of the recorded
    entries (the midpoint between the k-th and (k+1)-th smallest |x|; -1 keeps all for p = 0)."""
    n_layers = sparsity.shape[0]
    out = torch.full((n_layers, len(SITES)), -1.0)
    for li in range(n_layers):
        for state in HIDDEN_STATES:
            a = records[(li, state)].flatten().sort().values
            n = a.numel()
            for j, site in enumerate(SITES):
                if SITE_STATE[site] != state:
                    continue
                k = int(round(float(sparsity[li, j]) * n))
                if k <= 0:
                    continue
                hi = a[min(k, n - 1)]
                out[li, j] = float(((a[k - 1] + hi) / 2).item()) if k < n else float(a[-1].item())
    return out


@torch.no_grad()
def measure_realized(dec, prompt: torch.Tensor, new_tokens: int, forced=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(realized sparsity [L, 7] over the decode steps, generated ids) with the current settings, eager."""
    compiled, dec._compiled = dec._compiled, None
    dec.count = True
    dec.reset_stats()
    try:
        ids, _ = dec.generate(prompt, new_tokens, forced=forced)
        return dec.realized(), ids
    finally:
        dec.count = False
        dec._compiled = compiled


@torch.no_grad()
def calibrate_decode(dec, prompt: torch.Tensor, new_tokens: int, sparsity, iters: int = 3,
                     backend: str = "torch", tol: float | None = None, pool: bool = False,
                     info: dict | None = None, forced: torch.Tensor | None = None,
                     dense_records: dict | None = None) -> torch.Tensor:
    """Thresholds [L, 7] for target sparsities (scalar or [L, 7]) on `prompt`'s decode steps.

    The dense run gives first thresholds; each of up to `iters` sparse passes runs with the
    latest thresholds, counts the realized sparsity per (layer, site) and records the inputs it
    sees, from which the next thresholds are taken (`pool`: from every sparse pass so far).
    Sparsifying changes the greedy trajectory, hence the distributions (the o_proj input most),
    so the passes need not settle exactly: the thresholds whose measured realized sparsity was
    closest to the target (max over (layer, site)) are returned; stop early once within `tol`.
    With `forced` tokens (teacher forcing, see Decoder.generate) every pass decodes the same
    sequence and the passes converge: thresholds of layer l only move the inputs of later layers.
    `info` (a dict) receives the deviation of each pass ("max_dev_per_pass") and, for the
    returned thresholds, the realized sparsity [L, 7] and the ids of the pass that measured them
    ("realized", "ids"; the sparse passes run `backend`: with the benchmark's own backend and
    forced tokens, that pass is the eager run of exactly the benchmarked setting).
    `dense_records`: record_decode_inputs of the dense run on the same tokens, if already taken
    (it does not depend on the target, so a sweep takes it once).
    """
    p = torch.as_tensor(sparsity, dtype=torch.float32).expand(dec.cfg.n_layers, len(SITES)).clone()
    saved = (dec.backend, dec.thresholds.clone(), dec._compiled)
    dec._compiled = None  # calibration runs eagerly: it records inputs on the host side
    devs, best, pooled = [], None, {}
    try:
        if dense_records is None:
            dec.set_sparsity(None, backend="dense")
            dense_records = record_decode_inputs(dec, prompt, new_tokens, forced)
        t = quantile_thresholds(dense_records, p)
        for _ in range(iters):
            dec.set_sparsity(t, backend=backend)
            dec.count = True
            dec.reset_stats()
            got = {}
            try:
                rec = record_decode_inputs(dec, prompt, new_tokens, forced, out=got)
            finally:
                dec.count = False
            realized = dec.realized()
            dev = float((realized - p).abs().nan_to_num(0.0).max())
            devs.append(dev)
            if best is None or dev < best[0]:
                best = (dev, t, realized, got["ids"])
            if tol is not None and dev <= tol:
                break
            if pool:
                for k, v in rec.items():
                    pooled[k] = torch.cat([pooled[k], v]) if k in pooled else v
                rec = pooled
            t = quantile_thresholds(rec, p)
    finally:
        dec.backend, dec._compiled = saved[0], saved[2]
        dec.thresholds.copy_(saved[1])
    if info is not None:
        info["max_dev_per_pass"] = devs
        if best is not None:
            info["realized"], info["ids"], info["backend"] = best[2], best[3], backend
    return best[1] if best is not None else t


def param_weighted_mean(cfg, sparsity: torch.Tensor) -> float:
    params = torch.tensor([cfg.site_params()[s] for s in SITES], dtype=torch.float64)
    return float((sparsity.double() * params).sum() / (params.sum() * sparsity.shape[0]))


def nonuniform_allocation(cfg, target: float) -> torch.Tensor:
    """A greedy-like allocation [L, 7]: per-site and per-layer sparsities that differ (attention
    q/k and gate higher, v/o/up lower, a ramp over depth), averaging to `target` by parameter
    count, so that it skips as many weight bytes as uniform `target` does. Synthetic: it stands
    in for Algorithm 1's output on a model whose weights are random, to show that the fast path
    takes any per-(layer, site) sparsities."""
    site_off = torch.tensor([0.10, 0.10, -0.05, -0.15, 0.05, -0.05, 0.0])
    n = cfg.n_layers
    layer_off = 0.1 * (torch.arange(n, dtype=torch.float32) / max(n - 1, 1) - 0.5)
    p = (target + site_off[None, :] + layer_off[:, None]).clamp(0.0, 0.95)
    for _ in range(20):  # shift everything until the parameter-weighted mean is the target
        p = (p + (target - param_weighted_mean(cfg, p))).clamp(0.0, 0.95)
    return p


__all__ = ["calibrate_decode", "measure_realized", "record_decode_inputs", "quantile_thresholds",
           "nonuniform_allocation", "param_weighted_mean"]
