"""Fit Gaussian, Laplace and generalized-normal laws to every (layer, hidden state); goodness of fit;
thresholds from the fitted laws.

TEAL observes that the hidden states entering attention and the MLP look Gaussian and the
intermediate ones (attention output, the MLP's SiLU(gate) * up) look Laplacian. This module
checks that on calibration histograms (`teal_nb.activations.Histograms`), without ever holding
the activations.

All laws are centred at zero, as TEAL's thresholds are (|x| <= t); the measured means are tiny
next to the spread and are reported beside the fits. Each law is the maximum-likelihood fit:

    gaussian  N(0, sigma^2)          sigma^2 = E x^2                    (exact moments)
    laplace   Laplace(0, b)          b = E|x|                           (exact moments)
    gennorm   f(x) = beta / (2 alpha Gamma(1/beta)) exp(-|x / alpha|^beta)
              alpha = (beta E|x|^beta)^(1/beta) for each beta, and beta maximises the profile
              log-likelihood (1-D search); E|x|^beta from the histogram with each bin's mass at its
              centre (runs of 4 bins, 2.3% wide, merged for speed: the binning error is far below the
              differences we read).
              beta = 2 is the Gaussian, beta = 1 the Laplace; beta < 1 is heavier-tailed than Laplace.

Goodness of fit, per (layer, state):
    ll      mean log-likelihood per value (nats). Differences between laws are scale-free:
            ll_laplace - ll_gaussian > 0 means the data prefer Laplace.
    ks      Kolmogorov-Smirnov distance: max |F_data - F_law| over the histogram's bin edges on the
            signed axis (skew shows up here, as the laws are symmetric).
    ks_abs  the same for |x|, the distribution that thresholds are quantiles of.

scipy is not needed: the incomplete gamma function is `torch.special.gammainc`, and its inverse
(for generalized-normal thresholds) is a vectorised bisection.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .activations import LO, NB, Histograms, abs_edges
from .config import HIDDEN_STATES

LAWS = ("gaussian", "laplace", "gennorm")
# The generalized-normal shape is searched over this range (log-spaced grid, then golden section).
BETA_RANGE = (0.05, 8.0)


# ------------------------------------------------------------------------ the three laws, |x| side

def abs_cdf(law: str, a: torch.Tensor, params: dict) -> torch.Tensor:
    """P(|X| <= a) for a >= 0 under a fitted law; params broadcast against `a`."""
    a = torch.as_tensor(a, dtype=torch.float64)
    if law == "gaussian":
        return torch.erf(a / (params["sigma"] * math.sqrt(2.0)))
    if law == "laplace":
        return -torch.expm1(-a / params["b"])
    if law == "gennorm":
        beta = params["beta"]
        return torch.special.gammainc(1.0 / beta, (a / params["alpha"]) ** beta)
    raise ValueError(f"law must be one of {LAWS}, got {law!r}")


def pdf(law: str, x: torch.Tensor, params: dict) -> torch.Tensor:
    """Density of the (signed, zero-centred) law at x."""
    x = torch.as_tensor(x, dtype=torch.float64).abs()
    if law == "gaussian":
        s = params["sigma"]
        return torch.exp(-0.5 * (x / s) ** 2) / (s * math.sqrt(2 * math.pi))
    if law == "laplace":
        b = params["b"]
        return torch.exp(-x / b) / (2 * b)
    if law == "gennorm":
        beta, alpha = torch.as_tensor(params["beta"], dtype=torch.float64), params["alpha"]
        return beta / (2 * alpha * torch.exp(torch.lgamma(1 / beta))) * torch.exp(-(x / alpha) ** beta)
    raise ValueError(f"law must be one of {LAWS}, got {law!r}")


def gammaincinv(a: torch.Tensor, p: torch.Tensor, iters: int = 200) -> torch.Tensor:
    """Inverse of the regularized lower incomplete gamma P(a, .) by bisection (float64, vectorised)."""
    a, p = torch.broadcast_tensors(torch.as_tensor(a, dtype=torch.float64),
                                   torch.as_tensor(p, dtype=torch.float64))
    lo, hi = torch.zeros_like(a), torch.ones_like(a)
    while True:  # grow the bracket until P(a, hi) >= p everywhere
        short = torch.special.gammainc(a, hi) < p
        if not short.any():
            break
        hi = torch.where(short, hi * 4, hi)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        below = torch.special.gammainc(a, mid) < p
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return torch.where(p <= 0, torch.zeros_like(a), 0.5 * (lo + hi))


def law_threshold(law: str, p, params: dict) -> torch.Tensor:
    """The t with P(|X| <= t) = p under a fitted law (the threshold for target sparsity p)."""
    p = torch.as_tensor(p, dtype=torch.float64)
    if ((p < 0) | (p >= 1) | p.isnan()).any():
        raise ValueError("sparsities must be in [0, 1)")
    if law == "gaussian":
        return params["sigma"] * math.sqrt(2.0) * torch.erfinv(p)
    if law == "laplace":
        return -params["b"] * torch.log1p(-p)
    if law == "gennorm":
        beta = params["beta"]
        return params["alpha"] * gammaincinv(1.0 / beta, p) ** (1.0 / beta)
    raise ValueError(f"law must be one of {LAWS}, got {law!r}")


# ------------------------------------------------------------------------ binned data

def _bin_centres(hist: Histograms) -> torch.Tensor:
    """|x| at the centre of each bin, [L, 4, NB + 2]: geometric centres of the log bins, LO/2 for
    the bin below LO, and the largest |x| seen for the overflow bin."""
    e = abs_edges()
    c = torch.empty(NB + 2, dtype=torch.float64)
    c[0] = LO / 2
    c[1:NB + 1] = (e[1:NB + 1] * e[2:NB + 2]).sqrt()
    c = c.expand(*hist.counts.shape[:2], -1).clone()
    top = torch.maximum(hist.moment("max").abs(), hist.moment("min").abs())
    c[..., -1] = torch.maximum(top, c[..., -2])
    return c


def _abs_mass(hist: Histograms) -> torch.Tensor:
    counts = hist.abs_counts().double()
    return counts / counts.sum(-1, keepdim=True).clamp_min(1e-300)


def _gn_profile(mass: torch.Tensor, log_c: torch.Tensor, beta: torch.Tensor):
    """Profile log-likelihood per value of the generalized normal at shape beta [...], and alpha."""
    m = (mass * torch.exp(beta.unsqueeze(-1) * log_c)).sum(-1)           # E|x|^beta
    alpha = (beta * m).clamp_min(1e-300) ** (1.0 / beta)
    ll = torch.log(beta) - torch.log(2 * alpha) - torch.lgamma(1.0 / beta) - 1.0 / beta
    return ll, alpha


def _fit_gennorm(mass: torch.Tensor, centres: torch.Tensor, grid: int = 48, golden: int = 32,
                  merge: int = 4):
    """MLE (beta, alpha, ll) per row of binned |x| data: a log-spaced grid over BETA_RANGE, then
    golden-section search between the best grid point's neighbours."""
    used = (mass > 0).any(dim=tuple(range(mass.dim() - 1))).nonzero()
    lo_i, hi_i = int(used.min()), int(used.max()) + 1      # bins empty in every row cost nothing
    mass, log_c = mass[..., lo_i:hi_i], centres[..., lo_i:hi_i].log()
    if merge > 1:  # merge runs of `merge` bins, mass at their mass-weighted log-centre (speed)
        pad = (-mass.shape[-1]) % merge
        mass, log_c = F.pad(mass, (0, pad)), F.pad(log_c, (0, pad), value=0.0)
        mass = mass.unflatten(-1, (-1, merge))
        log_c = (mass * log_c.unflatten(-1, (-1, merge))).sum(-1) / mass.sum(-1).clamp_min(1e-300)
        mass = mass.sum(-1)
    f = lambda log_beta: _gn_profile(mass, log_c, log_beta.exp())[0]  # noqa: E731
    lo_b, hi_b = math.log(BETA_RANGE[0]), math.log(BETA_RANGE[1])
    logs = torch.linspace(lo_b, hi_b, grid, dtype=torch.float64)
    lls = torch.stack([f(torch.full(mass.shape[:-1], float(v), dtype=torch.float64)) for v in logs], -1)
    k = lls.nan_to_num(-math.inf).argmax(-1)
    step = (hi_b - lo_b) / (grid - 1)
    a, b = (logs[k] - step).clamp_min(lo_b), (logs[k] + step).clamp_max(hi_b)
    g = (math.sqrt(5) - 1) / 2
    x1, x2 = b - g * (b - a), a + g * (b - a)
    f1, f2 = f(x1), f(x2)
    for _ in range(golden):  # one new evaluation per step: the other interior point is reused
        left = f1 > f2       # the maximum lies in [a, x2]
        a, b = torch.where(left, a, x1), torch.where(left, x2, b)
        new = torch.where(left, b - g * (b - a), a + g * (b - a))
        fn = f(new)
        x1, x2 = torch.where(left, new, x2), torch.where(left, x1, new)
        f1, f2 = torch.where(left, fn, f2), torch.where(left, f1, fn)
    beta = (0.5 * (a + b)).exp()
    ll, alpha = _gn_profile(mass, log_c, beta)
    return beta, alpha, ll


def _signed_axis(hist: Histograms):
    """Empirical CDF of x at the finite signed bin edges: (edges [E], cdf [L, 4, E])."""
    e = abs_edges()[:-1]                           # the NB + 2 finite |x| edges 0, LO, ..., HI
    neg, pos = hist.counts[:, :, 0].double(), hist.counts[:, :, 1].double()
    total = (neg.sum(-1) + pos.sum(-1)).clamp_min(1e-300).unsqueeze(-1)
    # F(-e_i) = mass of negatives with |x| >= e_i; F(+e_i) = all negatives + positives with |x| < e_i.
    neg_ge = neg.flip(-1).cumsum(-1).flip(-1)                       # |x| >= e_i, i = 0..NB + 1
    pos_lt = torch.cat([torch.zeros_like(pos[..., :1]), pos.cumsum(-1)[..., :NB + 1]], -1)
    edges = torch.cat([-e.flip(0), e[1:]])
    cdf = torch.cat([neg_ge.flip(-1), (neg.sum(-1, keepdim=True) + pos_lt)[..., 1:]], -1) / total
    return edges, cdf


# ------------------------------------------------------------------------ fits of a whole model

@dataclass
class Fits:
    """Fitted laws and goodness of fit per (layer, hidden state); every tensor is [L, 4] float64."""
    model: str
    params: dict                    # law -> {name: tensor}: gaussian {sigma}, laplace {b}, gennorm {alpha, beta}
    ll: dict                        # law -> mean log-likelihood per value (nats)
    ks: dict                        # law -> KS distance on the signed axis
    ks_abs: dict                    # law -> KS distance of |x|
    stats: dict                     # mean, std, kurtosis (non-excess, about 0), count
    meta: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return self.ll["gaussian"].shape[0]

    @property
    def beta(self) -> torch.Tensor:
        return self.params["gennorm"]["beta"]

    def delta_ll(self) -> torch.Tensor:
        """ll_laplace - ll_gaussian: > 0 where the data prefer Laplace (nats per value)."""
        return self.ll["laplace"] - self.ll["gaussian"]

    def best(self, laws=("gaussian", "laplace")) -> list[list[str]]:
        """The law with the highest likelihood per (layer, state), among `laws`."""
        stacked = torch.stack([self.ll[law] for law in laws], -1).argmax(-1)
        return [[laws[i] for i in row] for row in stacked.tolist()]

    def law_params(self, law: str, layer=None, state=None) -> dict:
        """Parameters of one law, optionally at one (layer, state name or index)."""
        if law not in LAWS:
            raise ValueError(f"law must be one of {LAWS}, got {law!r}")
        out = self.params[law]
        if layer is not None:
            s = HIDDEN_STATES.index(state) if isinstance(state, str) else state
            out = {k: v[layer, s] for k, v in out.items()}
        return out

    def thresholds(self, p, law: str) -> torch.Tensor:
        """Thresholds [L, 4] for target sparsity p (scalar or [L, 4]) from a fitted law."""
        p = torch.as_tensor(p, dtype=torch.float64).expand(self.ll["gaussian"].shape)
        return law_threshold(law, p, self.law_params(law))

    def rows(self) -> list[dict]:
        """One flat record per (layer, state), for tables and JSON."""
        best = self.best()
        out = []
        for li in range(self.n_layers):
            for si, state in enumerate(HIDDEN_STATES):
                r = {"layer": li, "state": state,
                     "mean": self.stats["mean"][li, si].item(), "std": self.stats["std"][li, si].item(),
                     "kurtosis": self.stats["kurtosis"][li, si].item(),
                     "sigma": self.params["gaussian"]["sigma"][li, si].item(),
                     "b": self.params["laplace"]["b"][li, si].item(),
                     "beta": self.params["gennorm"]["beta"][li, si].item(),
                     "alpha": self.params["gennorm"]["alpha"][li, si].item()}
                for law in LAWS:
                    r[f"ll_{law}"] = self.ll[law][li, si].item()
                for law in LAWS:
                    r[f"ks_{law}"] = self.ks[law][li, si].item()
                for law in LAWS:
                    r[f"ks_abs_{law}"] = self.ks_abs[law][li, si].item()
                r["delta_ll"] = r["ll_laplace"] - r["ll_gaussian"]
                r["best"] = best[li][si]
                out.append(r)
        return out

    def frame(self):
        """`rows()` as a pandas DataFrame (pandas imported here, not at package import)."""
        import pandas as pd

        return pd.DataFrame(self.rows())


@contextmanager
def _one_thread():
    """Run small elementwise work on one thread: on a busy machine, intra-op threads waiting for each
    other made the fit 60x slower (12 s instead of 0.2 s on 2 shared cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def fit(hist: Histograms) -> Fits:
    """Fit the three laws to every (layer, hidden state) of calibration histograms."""
    with _one_thread():
        return _fit(hist)


def _fit(hist: Histograms) -> Fits:
    n = hist.moment("count")
    if (n == 0).any():
        raise ValueError("histograms with no values for some (layer, state): calibrate first")
    ex2 = hist.moment("sum_sq") / n
    params = {"gaussian": {"sigma": ex2.sqrt()},
              "laplace": {"b": hist.moment("mean_abs")}}
    mass, centres = _abs_mass(hist), _bin_centres(hist)
    beta, alpha, ll_gn = _fit_gennorm(mass, centres)
    params["gennorm"] = {"alpha": alpha, "beta": beta}
    ll = {"gaussian": -0.5 * torch.log(2 * math.pi * ex2) - 0.5,
          "laplace": -torch.log(2 * params["laplace"]["b"]) - 1.0,
          "gennorm": ll_gn}

    edges, cdf = _signed_axis(hist)
    abs_e = abs_edges()[:-1]
    abs_cdf_data = torch.cat([torch.zeros_like(mass[..., :1]), mass.cumsum(-1)[..., :NB + 1]], -1)
    ks, ks_abs = {}, {}
    for law in LAWS:
        pr = {k: v.unsqueeze(-1) for k, v in params[law].items()}
        g = abs_cdf(law, abs_e, pr)                                  # [L, 4, NB + 2]
        ks_abs[law] = (g - abs_cdf_data).abs().amax(-1)
        law_cdf = torch.cat([0.5 - 0.5 * g.flip(-1), 0.5 + 0.5 * g[..., 1:]], -1)
        ks[law] = (law_cdf - cdf).abs().amax(-1)
    stats = {"mean": hist.moment("mean"), "std": hist.moment("std"),
             "kurtosis": hist.moment("kurtosis"), "count": n}
    return Fits(hist.model, params, ll, ks, ks_abs, stats, {"calibration": hist.meta})


def empirical_density(hist: Histograms, layer: int, state, edges: torch.Tensor) -> torch.Tensor:
    """Density of x on coarser signed bins `edges` [K + 1] (increasing), from a calibration histogram.

    Each fine bin's mass goes to the coarse bin holding its centre: for plots, where the coarse
    bins are many fine bins wide.
    """
    s = HIDDEN_STATES.index(state) if isinstance(state, str) else state
    c = _bin_centres(hist)[layer, s]
    neg, pos = hist.counts[layer, s, 0].double(), hist.counts[layer, s, 1].double()
    x = torch.cat([-c, c])
    w = torch.cat([neg, pos])
    edges = torch.as_tensor(edges, dtype=torch.float64)
    idx = torch.bucketize(x, edges, right=True) - 1
    keep = (idx >= 0) & (idx < len(edges) - 1)
    dens = torch.zeros(len(edges) - 1, dtype=torch.float64).index_add_(0, idx[keep], w[keep])
    return dens / w.sum().clamp_min(1e-300) / edges.diff()


def sparsity_at(hist: Histograms, t: torch.Tensor) -> torch.Tensor:
    """Fraction of calibration values with |x| <= t, per (layer, state), for thresholds t [L, 4]:
    the sparsity a threshold gives on the data it was calibrated on (linear inside a bin)."""
    counts = hist.abs_counts().double()
    cdf = torch.cat([torch.zeros_like(counts[..., :1]), counts.cumsum(-1)], -1)
    cdf = cdf / cdf[..., -1:].clamp_min(1e-300)                          # at the NB + 3 edges
    edges = abs_edges().expand_as(cdf).clone()
    top = torch.maximum(hist.moment("max").abs(), hist.moment("min").abs())
    edges[..., -1] = torch.maximum(top, edges[..., -2])                    # close the overflow bin
    t = torch.as_tensor(t, dtype=torch.float64).expand(cdf.shape[:-1]).unsqueeze(-1)
    b = (torch.searchsorted(edges.contiguous(), t.contiguous(), right=True) - 1).clamp(0, NB + 1)
    lo, hi = edges.gather(-1, b), edges.gather(-1, b + 1)
    frac = ((t - lo) / (hi - lo).clamp_min(1e-300)).clamp(0, 1)
    out = cdf.gather(-1, b) + frac * (cdf.gather(-1, b + 1) - cdf.gather(-1, b))
    return torch.where(t < 0, torch.zeros_like(out), out).squeeze(-1)


@torch.no_grad()
def sample_states(model, batches: torch.Tensor, layers, positions: slice = slice(None)) -> dict:
    """Raw hidden states of a few layers: {(layer, state): float32 [tokens, dim]} over `batches` [n, T].

    For analyses the histograms cannot do (per channel, per token); keep `batches` small, everything is
    held in memory.
    """
    from .activations import STATE_READER
    from .models import decoder_layers, model_sites

    out, handles = {}, []
    all_layers, all_sites = decoder_layers(model), model_sites(model)

    def hook(key):
        def f(module, args):
            x = args[0][..., positions, :]
            out.setdefault(key, []).append(x.detach().float().reshape(-1, x.shape[-1]).cpu())
        return f

    for li in layers:
        for state in HIDDEN_STATES:
            module = all_layers[li].get_submodule(all_sites[li][STATE_READER[state]].attr)
            handles.append(module.register_forward_pre_hook(hook((li, state))))
    try:
        device = next(model.parameters()).device
        for row in batches:
            model(row[None].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in out.items()}


def histograms_of(samples: dict, name: str = "samples") -> tuple[Histograms, list]:
    """Pack {key: values} into one-layer-per-key `Histograms` (state 0 holds the values; the other
    three states get the same values so that every row is fittable). Returns (hist, keys)."""
    keys = list(samples)
    h = Histograms.empty(name, len(keys))
    for i, k in enumerate(keys):
        for s in range(len(HIDDEN_STATES)):
            h.add(i, s, samples[k])
    return h, keys


__all__ = ["LAWS", "Fits", "fit", "pdf", "abs_cdf", "law_threshold", "gammaincinv", "empirical_density",
           "BETA_RANGE", "sparsity_at", "sample_states", "histograms_of"]
