"""Stream per-(layer, hidden state) histograms and exact moments of a model's activations.

Nothing is kept but counts: every hidden state entry falls into one bin of a fixed,
sign-symmetric, log-spaced grid (|x| from 1e-6 to 1e4, 0.6% wide bins), so a Llama-3-8B
calibration over millions of tokens needs a few MB, and thresholds come out of the
histogram to a fraction of a bin by interpolation.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import HIDDEN_STATES
from .models import decoder_layers, model_id, model_sites

# The grid: bin 0 holds |x| < LO (zeros included), bins 1..NB are log-spaced over [LO, HI),
# bin NB+1 holds |x| >= HI. The same grid for both signs.
LO, HI, NB = 1e-6, 1e4, 4000
_LOG_LO, _DLOG = math.log(LO), (math.log(HI) - math.log(LO)) / NB
MOMENTS = ("count", "sum", "sum_sq", "sum_abs", "sum_4", "min", "max", "nan")


def abs_edges() -> torch.Tensor:
    """Edges of the |x| bins: [0, LO, ..., HI, inf], float64, length NB + 3."""
    inner = torch.exp(_LOG_LO + _DLOG * torch.arange(NB + 1, dtype=torch.float64))
    return torch.cat([torch.zeros(1, dtype=torch.float64), inner,
                      torch.full((1,), math.inf, dtype=torch.float64)])


def bin_index(x: torch.Tensor) -> torch.Tensor:
    """Bin of each entry in a [2 * (NB + 2)] signed histogram: negatives first, then positives."""
    a = x.abs().float()
    idx = ((a.clamp_min(LO).log() - _LOG_LO) / _DLOG).floor().long() + 1
    idx = torch.where(a < LO, 0, idx.clamp(1, NB + 1))
    return idx + (x > 0).long() * (NB + 2)


@dataclass
class Histograms:
    """Signed histograms `counts[layer, state, sign, bin]` and moments `moments[layer, state, m]`."""
    model: str
    counts: torch.Tensor            # float64 [L, 4, 2, NB + 2]; sign 0 = negative (and zero), 1 = positive
    moments: torch.Tensor           # float64 [L, 4, len(MOMENTS)]
    meta: dict = field(default_factory=dict)

    @classmethod
    def empty(cls, model: str, n_layers: int, meta: dict | None = None) -> "Histograms":
        moments = torch.zeros(n_layers, len(HIDDEN_STATES), len(MOMENTS), dtype=torch.float64)
        moments[..., MOMENTS.index("min")] = math.inf
        moments[..., MOMENTS.index("max")] = -math.inf
        return cls(model, torch.zeros(n_layers, len(HIDDEN_STATES), 2, NB + 2, dtype=torch.float64),
                   moments, dict(meta or {}))

    @property
    def n_layers(self) -> int:
        return self.counts.shape[0]

    def add(self, layer: int, state: int, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1)
        nan = torch.isnan(x)
        if nan.any():  # NaNs are counted, never binned: a calibration with NaNs is reported, not hidden
            self.moments[layer, state, MOMENTS.index("nan")] += nan.sum().item()
            x = x[~nan]
        # Bin and reduce where x lives (GPU or CPU); only the counts and five scalars come back.
        self.counts[layer, state].view(-1).add_(
            torch.bincount(bin_index(x), minlength=2 * (NB + 2)).to("cpu", torch.float64))
        if not x.numel():
            return
        x64 = x.double()
        sums = torch.stack([x64.sum(), (x64 * x64).sum(), x64.abs().sum(), (x64 * x64).square().sum(),
                            x64.min(), x64.max()]).cpu()
        m = self.moments[layer, state]
        m[0] += x64.numel()
        m[1:5] += sums[:4]
        m[5] = torch.minimum(m[5], sums[4])
        m[6] = torch.maximum(m[6], sums[5])

    def abs_counts(self) -> torch.Tensor:
        """Histogram of |x| over `abs_edges()`: [L, 4, NB + 2]."""
        return self.counts.sum(dim=2)

    def moment(self, name: str) -> torch.Tensor:
        """Per (layer, state): 'mean', 'std', 'mean_abs', 'kurtosis' (non-excess), or a raw moment."""
        m = self.moments
        n = m[..., 0].clamp_min(1)
        mean, ex2 = m[..., 1] / n, m[..., 2] / n
        if name == "mean":
            return mean
        if name == "std":
            return (ex2 - mean ** 2).clamp_min(0).sqrt()
        if name == "mean_abs":
            return m[..., 3] / n
        if name == "kurtosis":  # about zero, as the fitted laws are centred at zero
            return (m[..., 4] / n) / ex2.clamp_min(1e-300) ** 2
        return m[..., MOMENTS.index(name)]

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        meta = {"model": self.model, "grid": json.dumps({"lo": LO, "hi": HI, "nb": NB}),
                "moments": json.dumps(MOMENTS), "states": json.dumps(HIDDEN_STATES),
                "meta": json.dumps(self.meta)}
        _atomic(path, lambda tmp: save_file({"counts": self.counts, "moments": self.moments}, tmp,
                                            metadata=meta))

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | str | None = None) -> "Histograms":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if json.loads(meta["grid"]) != {"lo": LO, "hi": HI, "nb": NB}:
            raise ValueError(f"{path}: histograms on another grid ({meta['grid']})")
        h = cls(meta["model"], tensors["counts"], tensors["moments"], json.loads(meta["meta"]))
        if model is not None:
            check_model(h.model, h.n_layers, model, str(path))
        return h


def check_model(saved: str, n_layers: int, model: nn.Module | str, what: str) -> None:
    """Refuse an artifact made for another model (by id, and by layer count when a model is given)."""
    want = model if isinstance(model, str) else model_id(model)
    if saved != want:
        raise ValueError(f"{what} was made for model {saved!r}, not {want!r}")
    if not isinstance(model, str) and len(model_sites(model)) != n_layers:
        raise ValueError(f"{what} has {n_layers} layers, the model has {len(model_sites(model))}")


def _atomic(path, write) -> None:
    """Write through a temporary file and rename: an interrupted save never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(str(tmp))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------ hooks

# The site whose linear input each hidden state is read from.
STATE_READER = {"attn_in": "q", "attn_out": "o", "mlp_in": "gate", "mlp_mid": "down"}


class Recorder:
    """Forward pre-hooks on one projection per hidden state, streaming into `Histograms`.

    `positions`: which token positions count (a slice over the sequence axis), e.g.
    `slice(1, None)` to leave out the first token, whose hidden states are outliers in many LLMs.
    """

    def __init__(self, model: nn.Module, hist: Histograms, positions: slice = slice(None)):
        self.hist, self.positions, self.handles = hist, positions, []
        for li, (layer, sites) in enumerate(zip(decoder_layers(model), model_sites(model))):
            for si, state in enumerate(HIDDEN_STATES):
                # The module at the site's attribute: on a sparsified model that is sparsify's wrapper,
                # so the recorded input is the one before thresholding.
                module = layer.get_submodule(sites[STATE_READER[state]].attr)
                self.handles.append(module.register_forward_pre_hook(self._hook(li, si)))

    def _hook(self, layer, state):
        def hook(module, args):
            x = args[0]
            self.hist.add(layer, state, x[..., self.positions, :] if x.dim() >= 2 else x)
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


@torch.no_grad()
def calibrate(model: nn.Module, batches: torch.Tensor, batch_size: int = 1,
              positions: slice = slice(None), meta: dict | None = None,
              progress: bool = True) -> Histograms:
    """Histograms of the 4 hidden states of every layer over token windows `batches` [n, length]."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    hist = Histograms.empty(model_id(model), len(model_sites(model)), meta)
    hist.meta.update(sequences=int(batches.shape[0]), seq_len=int(batches.shape[1]),
                     tokens=int(batches.numel()))
    with Recorder(model, hist, positions):
        for i in tqdm(range(0, batches.shape[0], batch_size), desc="calibrate", disable=not progress):
            model(batches[i:i + batch_size].to(device), use_cache=False)
    nan = hist.moment("nan").sum().item()
    if nan:
        raise FloatingPointError(f"calibration saw {int(nan)} NaN activations: the model or its dtype "
                                 "is broken for this input; thresholds would be meaningless")
    return hist
