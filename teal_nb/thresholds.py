"""Thresholds: the magnitude below which an activation entry is zeroed.

TEAL's rule zeroes entries with |x| <= t. For a target sparsity p:
- `abs` (ours, the default): t is the p-quantile of |x|, interpolated inside a histogram bin.
  Exact for any distribution, symmetric or not.
- `signed` (TEAL's code, for faithful reproduction): t = F^-1(0.5 + p/2) of the signed
  distribution. Equal to the |x| quantile when the distribution is symmetric about 0; off when
  it is skewed (the input of down_proj is: SiLU(gate) * up has a long one-sided tail).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .activations import NB, Histograms, _atomic, abs_edges, check_model
from .config import HIDDEN_STATES, SITE_STATE, SITES, check_sparsity

METHODS = ("abs", "signed")


def quantile_from_hist(counts: torch.Tensor, edges: torch.Tensor, q) -> torch.Tensor:
    """Interpolated q-quantiles of histograms: counts [..., B], edges [..., B + 1], q [...] -> [...]."""
    counts = counts.double()
    edges = edges.double().expand(*counts.shape[:-1], -1)
    cdf = counts.cumsum(-1)
    target = torch.as_tensor(q, dtype=torch.float64).expand(counts.shape[:-1]).unsqueeze(-1) * cdf[..., -1:]
    # First bin whose cumulative count reaches the target, then linear inside it.
    b = torch.searchsorted(cdf.contiguous(), target.contiguous()).clamp(max=counts.shape[-1] - 1)
    below = torch.where(b > 0, cdf.gather(-1, (b - 1).clamp_min(0)), torch.zeros_like(target))
    frac = ((target - below) / counts.gather(-1, b).clamp_min(1e-300)).clamp(0, 1)
    lo, hi = edges.gather(-1, b), edges.gather(-1, b + 1)
    return (lo + frac * (hi - lo)).squeeze(-1)


def _finite_edges(hist: Histograms) -> torch.Tensor:
    """|x| edges with the overflow bin closed at the largest |x| seen (per layer, state)."""
    edges = abs_edges().expand(*hist.counts.shape[:2], -1).clone()
    top = torch.maximum(hist.moment("max").abs(), hist.moment("min").abs())
    edges[..., -1] = torch.maximum(top, edges[..., -2])
    return edges


def state_thresholds(hist: Histograms, sparsity: torch.Tensor, method: str = "abs") -> torch.Tensor:
    """Thresholds [L, 4] for sparsities [L, 4] (one per layer and hidden state)."""
    if method not in METHODS:
        raise ValueError(f"threshold method must be one of {METHODS}, got {method!r}")
    p = torch.as_tensor(sparsity, dtype=torch.float64).expand(hist.counts.shape[:2])
    if ((p < 0) | (p >= 1) | p.isnan()).any():
        raise ValueError(f"sparsities must be in [0, 1), got values from {p.min().item()} to {p.max().item()}")
    edges = _finite_edges(hist)
    if method == "abs":
        out = quantile_from_hist(hist.abs_counts(), edges, p)
    else:
        # The signed distribution on one axis: negative bins mirrored (most negative first), then positive.
        neg, pos = hist.counts[:, :, 0], hist.counts[:, :, 1]
        signed = torch.cat([neg.flip(-1), pos], dim=-1)
        signed_edges = torch.cat([-edges.flip(-1), edges[..., 1:]], dim=-1)
        out = quantile_from_hist(signed, signed_edges, 0.5 + p / 2).clamp_min(0)
    return torch.where(p == 0, torch.zeros_like(out) - 1.0, out).float()  # p = 0: keep everything


# ---------------------------------------------------------------- closed forms (for tests and fits)

def gaussian_threshold(sigma: float, p: float) -> float:
    """P(|x| <= t) = p for x ~ N(0, sigma^2): t = sigma * sqrt(2) * erfinv(p)."""
    return float(sigma * math.sqrt(2.0) * torch.erfinv(torch.tensor(float(p), dtype=torch.float64)))


def laplace_threshold(b: float, p: float) -> float:
    """P(|x| <= t) = p for x ~ Laplace(0, b): t = -b * ln(1 - p)."""
    return -b * math.log1p(-p)


# ---------------------------------------------------------------- the table a model is sparsified with

@dataclass
class ThresholdTable:
    """Per-(layer, site) thresholds `values` [L, 7] (columns in SITES order) for one model."""
    model: str
    values: torch.Tensor
    sparsity: torch.Tensor          # the target sparsity each threshold was made for, [L, 7]
    meta: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return self.values.shape[0]

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        meta = {"model": self.model, "sites": json.dumps(SITES), "meta": json.dumps(self.meta)}
        _atomic(path, lambda tmp: save_file(
            {"values": self.values.contiguous(), "sparsity": self.sparsity.contiguous()}, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | str | None = None) -> "ThresholdTable":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if json.loads(meta.get("sites", "null")) != list(SITES):
                raise ValueError(f"{path} is not a teal_nb threshold table")
            t = cls(meta["model"], f.get_tensor("values"), f.get_tensor("sparsity"), json.loads(meta["meta"]))
        if model is not None:
            check_model(t.model, t.n_layers, model, f"threshold table {path}")
        return t


def site_sparsity(sparsity, n_layers: int) -> torch.Tensor:
    """Broadcast a scalar / per-site / per-(layer, site) sparsity to [L, 7], checking the range."""
    p = torch.as_tensor(sparsity, dtype=torch.float32)
    if p.dim() == 0:
        check_sparsity(p.item())
    p = p.expand(n_layers, len(SITES)).clone()
    if ((p < 0) | (p >= 1) | p.isnan()).any():
        raise ValueError("every sparsity must be in [0, 1)")
    return p


def table_from_hist(hist: Histograms, sparsity, method: str = "abs", meta: dict | None = None) -> ThresholdTable:
    """Thresholds for per-(layer, site) sparsities (scalar for uniform) from calibration histograms."""
    p = site_sparsity(sparsity, hist.n_layers)
    values = torch.empty_like(p)
    for j, site in enumerate(SITES):
        state = HIDDEN_STATES.index(SITE_STATE[site])
        sub = Histograms(hist.model, hist.counts[:, state:state + 1], hist.moments[:, state:state + 1])
        values[:, j] = state_thresholds(sub, p[:, j:j + 1], method)[:, 0]
    return ThresholdTable(hist.model, values, p,
                          {"method": method, "calibration": hist.meta, **(meta or {})})


def table_for(model: nn.Module, tok, sparsity, allocation: str = "uniform", method: str = "abs",
              refine: bool = True, progress: bool = True) -> ThresholdTable:
    """Thresholds for `model` at a model-wide sparsity, from C4 calibration (cached per model).

    `allocation`: "uniform" (every site at `sparsity`), "greedy" / "global" / a saved allocation
    file (per-(layer, site) sparsities, see teal_nb.greedy). `refine`: re-derive the thresholds
    on the sparsified model's own activations so realized sparsity meets the target
    (`calibration.refine_table`); False gives TEAL's dense-model thresholds.
    """
    from .calibration import cached_histograms, refine_table

    hist = cached_histograms(model, tok, progress=progress)
    if allocation == "uniform":
        p, meta = sparsity, {"allocation": "uniform"}
    else:
        from .greedy import allocation_sparsities  # per-(layer, site) sparsities of a saved allocation

        p, meta = allocation_sparsities(model, allocation, sparsity), {"allocation": str(allocation)}
    table = table_from_hist(hist, p, method, {**meta, "target": float(check_sparsity(float(sparsity)))})
    if refine and float(table.sparsity.max()) > 0:
        table = refine_table(model, tok, table, progress=progress)
    return table


__all__ = ["ThresholdTable", "table_from_hist", "table_for", "state_thresholds", "quantile_from_hist",
           "gaussian_threshold", "laplace_threshold", "NB"]
