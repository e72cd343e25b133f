"""A saved greedy allocation: every layer's path, and the rules that turn it into per-site sparsities.

The greedy search (`teal_nb.greedy`) walks each layer from dense to a maximum sparsity in steps
that each skip the same number of weight bytes. Row k of a layer's path holds the seven site
sparsities after k accepted steps, their block error, and the error of uniform sparsity at the
same effective (parameter-weighted) sparsity. Two rules read an allocation at a model-wide target:

- `greedy` (TEAL's rule): every layer takes the row of its path closest to the target.
- `global` (ours, not in the paper): one budget of steps for the whole model, spread so that the
  summed block error is smallest, i.e. layers whose error grows slowly go sparser than the
  target and sensitive layers stay denser. Every step skips the same bytes in every layer (all
  layers have the same shape), so the budget is a step count, and the optimum of
  sum_l err_l(k_l) subject to sum_l k_l = budget is found exactly by dynamic programming.
  It assumes block errors add up, and uses the relative MSE so that errors of different layers
  are on one scale (each is a perturbation relative to the residual stream it lands in).

Saved as safetensors (the paths) with JSON metadata (model, search settings, provenance); loading
refuses an allocation made for another model.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .activations import _atomic, check_model
from .config import SITES, check_sparsity

RULES = ("greedy", "global")


@dataclass
class Allocation:
    model: str
    sparsity: torch.Tensor          # [L, K + 1, 7] site sparsities along each layer's path (row 0: dense)
    error: torch.Tensor             # [L, K + 1] block error of each row
    uniform_error: torch.Tensor     # [L, K + 1] block error of uniform sparsity at the row's effective sparsity
    effective: torch.Tensor         # [K + 1] effective block sparsity of row k (k equal byte steps)
    params: dict                    # site -> parameter count (the weights of the effective sparsity)
    config: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return self.sparsity.shape[0]

    @property
    def max_sparsity(self) -> float:
        return float(self.effective[-1])

    # ------------------------------------------------------------------ rules

    def check_target(self, target: float) -> float:
        target = check_sparsity(target, "target sparsity")
        if target > self.max_sparsity + 1e-9:
            raise ValueError(f"target sparsity {target} is beyond this allocation's paths, which end at "
                             f"{self.max_sparsity:.4f}; recompute with a higher max sparsity")
        return target

    def rows(self, target: float, rule: str = "greedy") -> torch.Tensor:
        """The path row each layer takes at a model-wide target sparsity: [L] (long)."""
        target = self.check_target(target)
        if rule == "greedy":
            # TEAL (utils.get_layer_greedy_sparsities): the row with the closest effective sparsity.
            k = int((self.effective - target).abs().argmin())
            return torch.full((self.n_layers,), k, dtype=torch.long)
        if rule == "global":
            step = float(self.effective[1] - self.effective[0])
            budget = int(round(target * self.n_layers / step))
            return min_total_error(self.error, budget)
        raise ValueError(f"allocation rule must be one of {RULES}, got {rule!r}")

    def site_sparsities(self, target: float, rule: str = "greedy") -> torch.Tensor:
        """Per-(layer, site) sparsities [L, 7] at a model-wide target sparsity."""
        k = self.rows(target, rule)
        return self.sparsity[torch.arange(self.n_layers), k].float()

    def effective_of(self, sparsities: torch.Tensor) -> torch.Tensor:
        """Effective (parameter-weighted) sparsity of each layer of a [L, 7] allocation."""
        w = torch.tensor([self.params[s] for s in SITES], dtype=torch.float64)
        return (sparsities.double() * w).sum(-1) / w.sum()

    def paths_sha256(self) -> str:
        """A hash of the paths alone (not the metadata): what results made with it can cite."""
        import hashlib

        h = hashlib.sha256()
        for t in (self.sparsity.float(), self.error.double(), self.uniform_error.double(), self.effective.double()):
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()

    # ------------------------------------------------------------------ files

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors = {"sparsity": self.sparsity.float().contiguous(), "error": self.error.double().contiguous(),
                   "uniform_error": self.uniform_error.double().contiguous(),
                   "effective": self.effective.double().contiguous()}
        meta = {"model": self.model, "kind": "teal_nb.allocation", "sites": json.dumps(SITES),
                "params": json.dumps(self.params), "config": json.dumps(self.config),
                "meta": json.dumps(self.meta)}
        _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
        # A readable summary beside it (what was run, how long it took): for people and git diffs.
        summary = {"model": self.model, "layers": self.n_layers, "rows": int(self.sparsity.shape[1]),
                   "max_sparsity": self.max_sparsity, "params": self.params, "config": self.config,
                   **self.meta}
        _atomic(Path(path).with_suffix(".json"),
                lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1, default=float) + "\n"))

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | str | None = None) -> "Allocation":
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no allocation at {path}: compute one with `teal-nb allocate`")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("kind") != "teal_nb.allocation" or json.loads(meta.get("sites", "null")) != list(SITES):
                raise ValueError(f"{path} is not a teal_nb allocation")
            t = {k: f.get_tensor(k) for k in f.keys()}
        alloc = cls(meta["model"], t["sparsity"], t["error"], t["uniform_error"], t["effective"],
                    json.loads(meta["params"]), json.loads(meta["config"]), json.loads(meta["meta"]))
        if model is not None:
            check_model(alloc.model, alloc.n_layers, model, f"allocation {path}")
        return alloc


def min_total_error(error: torch.Tensor, budget: int) -> torch.Tensor:
    """Rows k_l (one per layer) minimising sum_l error[l, k_l] subject to sum_l k_l = budget.

    Exact, by dynamic programming over layers (a min-plus convolution per layer):
    O(L * budget * K) additions, a few milliseconds for 32 layers x 200 rows.
    """
    L, R = error.shape
    if not 0 <= budget <= L * (R - 1):
        raise ValueError(f"budget of {budget} steps is outside [0, {L * (R - 1)}]")
    err = error.double()
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    best = torch.full((budget + 1,), float("inf"), dtype=torch.float64)
    best[0] = 0.0
    choice = torch.zeros(L, budget + 1, dtype=torch.long)
    for layer in range(L):
        new = torch.full_like(best, float("inf"))
        arg = torch.zeros(budget + 1, dtype=torch.long)
        for k in range(min(R, budget + 1)):
            cand = torch.cat([inf.expand(k), best[:budget + 1 - k]]) + err[layer, k]
            better = cand < new
            new = torch.where(better, cand, new)
            arg = torch.where(better, torch.tensor(k), arg)
        best, choice[layer] = new, arg
    rows = torch.zeros(L, dtype=torch.long)
    t = budget
    for layer in reversed(range(L)):
        rows[layer] = choice[layer, t]
        t -= int(rows[layer])
    return rows


# ---------------------------------------------------------------------- where allocations live

def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def repo_allocations_dir() -> Path:
    """data/allocations/ of the source tree (the committed allocation of the embedded model)."""
    return Path(__file__).resolve().parent.parent / "data" / "allocations"


def default_path(model: nn.Module | str) -> Path:
    """Where `teal-nb allocate` writes, and `--allocation greedy|global` reads, a model's allocation.

    The source tree's data/allocations/ when it exists (so the embedded model's allocation is
    committed with the code), else $TEAL_CACHE_DIR/allocations/.
    """
    from .models import cache_dir, model_id

    name = _safe(model if isinstance(model, str) else model_id(model)) + ".safetensors"
    repo = repo_allocations_dir()
    if (repo / name).exists() or repo.parent.is_dir():
        return repo / name
    return cache_dir() / "allocations" / name


__all__ = ["Allocation", "RULES", "min_total_error", "default_path"]
