"""Apply per-(layer, site) thresholds to a model, in place and reversibly.

Each projection that holds a site is swapped for a `ThresholdedLinear` wrapping the original
module (weights shared, nothing copied); `remove()` swaps the originals back.

    with sparsify(model, table, prefill="last_half") as sp:
        model(ids)
        print(sp.realized())          # realized sparsity per (layer, site)

Prefill protocol (which prompt tokens are sparse; one-token decode steps always are):
  none       prompt tokens dense (the decode-only setting of TEAL's speed numbers)
  last_half  the last half of each prompt sparse, as TEAL's evaluations do
  all        every token sparse

A right-padded batch of requests of different lengths has no single "last half": a caller that
knows each row's length registers it with `sp.set_row_lengths(lengths)` before the forward, and
each row is then sparsified over its own positions (last_half: [L // 2, L), all: [0, L); padding
dense and not counted). The lm-eval bridge does this to score log-likelihood requests in batches.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import SITES, check_prefill
from .models import Site, decoder_layers, model_sites


def sparse_mask(x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """TEAL's rule: zero the entries with |x| <= t. NaN compares false, so it is kept and propagates.

    A Python float threshold takes `hardshrink` (zero where -t <= x <= t: the same rule, one fused
    pass, ~50x faster than masked_fill on CPU); a tensor threshold (any shape that broadcasts) masks.
    """
    if isinstance(t, float):
        return F.hardshrink(x, t)
    return x.masked_fill(x.abs() <= t, 0)


class _Rows:
    """Per-row sparse positions of the next right-padded batch, shared by all wrapped linears."""

    def __init__(self):
        self.mask: torch.Tensor | None = None   # [B, T, 1] bool, True where a row is sparse
        self.shape: tuple[int, int] | None = None
        self.entries: int = 0                   # sparse positions in the batch (entries = this x width)
        self.strict = False                     # a batch (B > 1) without registered lengths is an error


class ThresholdedLinear(nn.Module):
    """A linear whose input is thresholded per output segment (one segment per site it holds)."""

    def __init__(self, linear: nn.Linear, segments: list[tuple[int, slice]], thresholds: torch.Tensor,
                 prefill: str, stats: torch.Tensor, rows: _Rows | None = None):
        super().__init__()
        self.linear = linear
        self.segments = segments            # (site column in SITES order, rows of the output)
        self.register_buffer("thresholds", thresholds, persistent=False)  # one per segment
        # the same values as Python floats, read once here: hardshrink takes a scalar, and reading a
        # device tensor per call would synchronize with the GPU at every projection
        self._t = [float(v) for v in thresholds.tolist()]
        self.prefill = prefill
        self.stats = stats                  # this layer's [7, 2] counters: zeros, entries seen while sparse
        self.rows = rows if rows is not None else _Rows()

    @property
    def weight(self):  # code that reads .weight (e.g. dtype probes) keeps working
        return self.linear.weight

    def _sparse_positions(self, x: torch.Tensor) -> slice | None:
        """The slice of the sequence axis to sparsify, None for dense."""
        t = x.shape[-2] if x.dim() >= 2 else 1
        if t == 1 or self.prefill == "all":
            return slice(None)
        if self.prefill == "last_half":
            return slice(t // 2, None)
        return None

    def _masked(self, x: torch.Tensor, i: int, pos: slice | None) -> torch.Tensor:
        if pos is None:
            return x
        t = self._t[i]
        if x.dim() < 2 or pos == slice(None):
            xs = part = sparse_mask(x, t)
        else:  # dense head, sparse tail: one concatenation instead of a clone and a slice copy
            part = sparse_mask(x[..., pos, :], t)
            xs = torch.cat((x[..., :pos.start, :], part), dim=-2)
        col = self.segments[i][0]
        n = part.numel()
        # zeros = entries - nonzeros; count_nonzero of the bool view is ~7x cheaper than (part == 0).sum()
        self.stats[col, 0] += n - torch.count_nonzero(part.bool())  # a device tensor op: no host sync per call
        self.stats[col, 1] += n
        return xs

    def _masked_rows(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Each row of a padded batch sparse over its own registered positions."""
        rows = self.rows
        xs = torch.where(rows.mask, sparse_mask(x, self._t[i]), x)
        col = self.segments[i][0]
        n = rows.entries * x.shape[-1]
        self.stats[col, 0] += n - torch.count_nonzero(xs.bool() & rows.mask)
        self.stats[col, 1] += n
        return xs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.rows
        if rows.mask is not None and x.dim() == 3 and x.shape[1] > 1 and tuple(x.shape[:2]) == rows.shape:
            mask = lambda i: self._masked_rows(x, i)  # noqa: E731
        elif rows.strict and x.dim() == 3 and x.shape[0] > 1 and x.shape[1] > 1:
            raise RuntimeError(f"a batch of {tuple(x.shape[:2])} reached a sparsified linear without its row "
                               f"lengths (registered: {rows.shape}): its last half would be the padded batch's")
        else:
            pos = self._sparse_positions(x)
            mask = lambda i: self._masked(x, i, pos)  # noqa: E731
        if len(self.segments) == 1:
            return self.linear(mask(0))
        w, b = self.linear.weight, self.linear.bias
        outs = [F.linear(mask(i), w[out_rows], None if b is None else b[out_rows])
                for i, (_, out_rows) in enumerate(self.segments)]
        return torch.cat(outs, dim=-1)


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


class Sparsified:
    """Handle of a sparsified model: `remove()`, context manager, realized sparsity."""

    def __init__(self, model: nn.Module, thresholds: torch.Tensor, prefill: str):
        self.model, self.prefill = model, prefill
        self.swapped: list[tuple[nn.Module, str, nn.Linear]] = []
        layers, sites = decoder_layers(model), model_sites(model)
        device = next(model.parameters()).device
        self.stats = torch.zeros(len(layers), len(SITES), 2, dtype=torch.long, device=device)
        self.rows = _Rows()
        self.device = device
        for li, (layer, layer_sites) in enumerate(zip(layers, sites)):
            by_linear: dict[str, list[Site]] = {}
            for site in layer_sites.values():
                by_linear.setdefault(site.attr, []).append(site)
            for attr, group in by_linear.items():
                cols = [SITES.index(s.name) for s in group]
                lin = group[0].linear
                t = thresholds[li, cols].to(device=lin.weight.device, dtype=lin.weight.dtype)
                _set(layer, attr, ThresholdedLinear(lin, [(c, s.rows) for c, s in zip(cols, group)],
                                                    t, prefill, self.stats[li], self.rows))
                self.swapped.append((layer, attr, lin))

    def realized(self) -> torch.Tensor:
        """Realized sparsity [L, 7] over the tokens that were sparsified so far (NaN where none were)."""
        zeros, seen = self.stats[..., 0].cpu().double(), self.stats[..., 1].cpu().double()
        return torch.where(seen > 0, zeros / seen.clamp_min(1), torch.full_like(seen, float("nan"))).float()

    def set_row_lengths(self, lengths, seq_len: int | None = None, strict: bool = True) -> None:
        """Register the true lengths of the rows of the next right-padded batch (None: forget them).

        Until replaced, a forward of shape [len(lengths), seq_len] sparsifies row r over its own
        positions under the prefill protocol ([L // 2, L) for last_half, [0, L) for all); with
        `strict`, any other batch of several rows and tokens raises instead of guessing.
        """
        r = self.rows
        if lengths is None:
            r.mask, r.shape, r.entries, r.strict = None, None, 0, strict
            return
        lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        seq_len = int(lengths.max()) if seq_len is None else int(seq_len)
        if (lengths < 1).any() or (lengths > seq_len).any():
            raise ValueError(f"row lengths must be in [1, {seq_len}], got {lengths.tolist()}")
        pos = torch.arange(seq_len)[None, :]
        if self.prefill == "none":
            start = lengths  # nothing sparse in a prompt
        elif self.prefill == "last_half":
            start = lengths // 2
        else:
            start = torch.zeros_like(lengths)
        mask = (pos >= start[:, None]) & (pos < lengths[:, None])
        r.mask = mask[..., None].to(self.device)
        r.shape, r.entries, r.strict = (len(lengths), seq_len), int(mask.sum()), strict

    def reset_stats(self) -> None:
        self.stats.zero_()

    def remove(self) -> None:
        for layer, attr, lin in reversed(self.swapped):
            _set(layer, attr, lin)
        self.swapped.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def sparsify(model: nn.Module, thresholds, prefill: str = "last_half") -> Sparsified:
    """Put per-(layer, site) thresholds in front of every projection of `model`, in place.

    `thresholds`: a `ThresholdTable` (checked against the model) or a tensor [L, 7] in SITES order.
    """
    from .activations import check_model
    from .thresholds import ThresholdTable

    check_prefill(prefill)
    if isinstance(thresholds, ThresholdTable):
        check_model(thresholds.model, thresholds.n_layers, model, "threshold table")
        thresholds = thresholds.values
    thresholds = torch.as_tensor(thresholds, dtype=torch.float32)
    n_layers = len(decoder_layers(model))
    if thresholds.shape != (n_layers, len(SITES)):
        raise ValueError(f"thresholds must be [{n_layers}, {len(SITES)}] (layers x {SITES}), "
                         f"got {tuple(thresholds.shape)}")
    if thresholds.isnan().any():
        raise ValueError("thresholds contain NaN")
    if any(isinstance(m, ThresholdedLinear) for m in model.modules()):
        raise RuntimeError("model is already sparsified: remove() the previous handle first")
    return Sparsified(model, thresholds, prefill)
