"""Thresholds against closed forms, streamed histograms against exact quantiles, tables refuse misuse."""
import math

import pytest
import torch

from teal_nb.activations import Histograms
from teal_nb.thresholds import (ThresholdTable, gaussian_threshold, laplace_threshold, state_thresholds,
                                table_from_hist)


def hist_of(x: torch.Tensor, chunks: int = 7) -> Histograms:
    """Stream x through a one-layer histogram in several chunks, state 0."""
    h = Histograms.empty("synthetic", 1)
    for part in x.chunk(chunks):
        h.add(0, 0, part)
    return h


def threshold(h, p, method="abs"):
    return state_thresholds(h, torch.full((1, 4), p), method)[0, 0].item()


N = 2_000_000


@pytest.mark.parametrize("p", [0.25, 0.5, 0.7, 0.9])
def test_gaussian_and_laplace_closed_forms(p):
    g = torch.Generator().manual_seed(1)
    sigma, b = 0.7, 0.05
    gauss = torch.randn(N, generator=g, dtype=torch.float64) * sigma
    lap = torch.distributions.Laplace(0.0, b).sample((N,)).double()
    for x, exact in [(gauss, gaussian_threshold(sigma, p)), (lap, laplace_threshold(b, p))]:
        h = hist_of(x)
        # Sampling error of a quantile at N=2e6 is ~1e-3 relative; the histogram adds far less.
        assert threshold(h, p) == pytest.approx(exact, rel=5e-3)
        assert threshold(h, p, "signed") == pytest.approx(exact, rel=5e-3)  # symmetric: the same


def test_closed_forms_themselves():
    # P(|x| <= t) = p, checked by the distributions' own CDFs.
    for p in (0.2, 0.5, 0.95):
        t = gaussian_threshold(2.0, p)
        assert math.erf(t / (2.0 * math.sqrt(2))) == pytest.approx(p, abs=1e-12)
        t = laplace_threshold(3.0, p)
        assert 1 - math.exp(-t / 3.0) == pytest.approx(p, abs=1e-12)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.8, 0.99])
def test_streamed_histogram_matches_exact_quantile(p):
    g = torch.Generator().manual_seed(2)
    # A scale mixture with outliers spanning 6 decades, like real hidden states.
    x = torch.randn(1_000_000, generator=g) * torch.exp(2 * torch.randn(1_000_000, generator=g))
    a = x.abs().sort().values
    exact = a[int(p * a.numel())].item()  # the sample's own quantile
    approx = threshold(hist_of(x), p)
    assert approx == pytest.approx(exact, rel=3e-3)  # well inside one 0.58% log-bin
    realized = (x.abs() <= approx).double().mean().item()
    assert realized == pytest.approx(p, abs=2e-3)


def test_moments_are_exact():
    x = torch.randn(100_000, dtype=torch.float64) * 3 + 0.5
    h = hist_of(x)
    assert h.moment("mean")[0, 0].item() == pytest.approx(x.mean().item(), rel=1e-10)
    assert h.moment("std")[0, 0].item() == pytest.approx(x.std(unbiased=False).item(), rel=1e-10)
    assert h.moment("mean_abs")[0, 0].item() == pytest.approx(x.abs().mean().item(), rel=1e-10)
    assert h.moment("max")[0, 0].item() == x.max().item()
    assert h.counts.sum().item() == x.numel()


def test_signed_icdf_is_wrong_for_skewed_states():
    # SiLU(gate) * up is one-sided-heavy: an exponential plus a small negative part.
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.empty(800_000).exponential_(1.0, generator=g),
                   -0.1 * torch.empty(200_000).exponential_(1.0, generator=g)])
    h = hist_of(x)
    t_abs, t_signed = threshold(h, 0.5), threshold(h, 0.5, "signed")
    assert (x.abs() <= t_abs).float().mean().item() == pytest.approx(0.5, abs=3e-3)
    assert abs((x.abs() <= t_signed).float().mean().item() - 0.5) > 0.05


def test_sparsity_zero_keeps_everything_and_range_is_checked():
    h = hist_of(torch.randn(10_000))
    assert threshold(h, 0.0) < 0  # |x| <= t never holds
    for bad in (1.0, -0.1, float("nan"), 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            table_from_hist(Histograms.empty("m", 2), bad)


def test_table_roundtrip_and_refuses_another_model(tmp_path):
    h = Histograms.empty("model-a", 3)
    for li in range(3):
        for si in range(4):
            h.add(li, si, torch.randn(5000))
    table = table_from_hist(h, 0.4, meta={"note": "x"})
    path = tmp_path / "t.safetensors"
    table.save(path)
    back = ThresholdTable.load(path, "model-a")
    assert torch.equal(back.values, table.values) and back.meta["note"] == "x"
    with pytest.raises(ValueError, match="made for model 'model-a', not 'model-b'"):
        ThresholdTable.load(path, "model-b")
    assert not list(tmp_path.glob(".*tmp"))  # nothing half-written left behind


def test_histograms_roundtrip_and_nan_is_counted(tmp_path):
    h = Histograms.empty("m", 1)
    h.add(0, 2, torch.tensor([1.0, float("nan"), -2.0]))
    assert h.moment("nan")[0, 2].item() == 1 and h.moment("count")[0, 2].item() == 2
    h.save(tmp_path / "h.safetensors")
    back = Histograms.load(tmp_path / "h.safetensors", "m")
    assert torch.equal(back.counts, h.counts) and torch.equal(back.moments, h.moments)
