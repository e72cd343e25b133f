"""Fits of Gaussian / Laplace / generalized-normal laws from streamed histograms recover known laws."""
import math

import pytest
import torch

from teal_nb import distributions as D
from teal_nb.activations import Histograms
from teal_nb.thresholds import gaussian_threshold, laplace_threshold, state_thresholds

N = 200_000


def gennorm_sample(n, alpha, beta, g):
    """|x| = alpha * G^(1/beta) with G ~ Gamma(1/beta, 1), random sign."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
    gam = torch.distributions.Gamma(torch.tensor(1.0 / beta), torch.tensor(1.0)).sample((n,))
    sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    return alpha * gam ** (1.0 / beta) * sign


@pytest.fixture(scope="module")
def fits():
    """One 'layer' whose 4 states are Gaussian(0.3), Laplace(0.2), GN(0.1, 0.7), GN(0.5, 1.5)."""
    g = torch.Generator().manual_seed(1)
    h = Histograms.empty("synthetic", 1)
    h.add(0, 0, torch.randn(N, generator=g) * 0.3)
    u = torch.rand(N, generator=g) - 0.5                      # Laplace by inverse CDF
    h.add(0, 1, -0.2 * u.sign() * torch.log1p(-2 * u.abs()))
    h.add(0, 2, gennorm_sample(N, 0.1, 0.7, g))
    h.add(0, 3, gennorm_sample(N, 0.5, 1.5, g))
    return h, D.fit(h)


def test_recovers_parameters(fits):
    h, f = fits
    assert f.params["gaussian"]["sigma"][0, 0].item() == pytest.approx(0.3, rel=0.01)
    assert f.params["laplace"]["b"][0, 1].item() == pytest.approx(0.2, rel=0.01)
    beta = f.beta[0]
    assert beta[0].item() == pytest.approx(2.0, rel=0.03)     # Gaussian is GN(beta=2)
    assert beta[1].item() == pytest.approx(1.0, rel=0.03)     # Laplace is GN(beta=1)
    assert beta[2].item() == pytest.approx(0.7, rel=0.03)
    assert beta[3].item() == pytest.approx(1.5, rel=0.03)
    assert f.params["gennorm"]["alpha"][0, 2].item() == pytest.approx(0.1, rel=0.03)
    assert f.params["gennorm"]["alpha"][0, 3].item() == pytest.approx(0.5, rel=0.03)


def test_likelihood_prefers_the_true_law(fits):
    _, f = fits
    assert f.best()[0][:2] == ["gaussian", "laplace"]
    d = f.delta_ll()[0]
    assert d[0] < -0.02 and d[1] > 0.02
    # The generalized normal nests both: never worse than either (up to binning error).
    for law in ("gaussian", "laplace"):
        assert (f.ll["gennorm"] >= f.ll[law] - 1e-3).all()
    # Closed-form ll of a Gaussian: -0.5 log(2 pi e sigma^2).
    assert f.ll["gaussian"][0, 0].item() == pytest.approx(-0.5 * math.log(2 * math.pi * math.e * 0.09), abs=0.01)


def test_ks_small_for_true_law_large_for_wrong(fits):
    _, f = fits
    for ks in (f.ks, f.ks_abs):
        assert ks["gaussian"][0, 0] < 0.01 and ks["laplace"][0, 0] > 0.03
        assert ks["laplace"][0, 1] < 0.01 and ks["gaussian"][0, 1] > 0.03
        assert (ks["gennorm"][0] < 0.01).all()


def test_skew_shows_on_the_signed_axis_only():
    # |x| Laplace but all positive: the |x| fit is perfect, the symmetric law misses half the axis.
    g = torch.Generator().manual_seed(2)
    h = Histograms.empty("skew", 1)
    x = -0.2 * torch.log(torch.rand(N, generator=g))
    for s in range(4):
        h.add(0, s, x)
    f = D.fit(h)
    assert f.ks_abs["laplace"][0, 0] < 0.01
    assert f.ks["laplace"][0, 0] > 0.4


def test_thresholds_match_closed_forms_and_data(fits):
    h, f = fits
    for p in (0.1, 0.5, 0.9):
        t_g = f.thresholds(p, "gaussian")[0, 0].item()
        assert t_g == pytest.approx(gaussian_threshold(f.params["gaussian"]["sigma"][0, 0].item(), p), rel=1e-9)
        t_l = f.thresholds(p, "laplace")[0, 1].item()
        assert t_l == pytest.approx(laplace_threshold(f.params["laplace"]["b"][0, 1].item(), p), rel=1e-9)
        # The GN at beta = 2 / beta = 1 gives the same thresholds as the Gaussian / Laplace closed forms.
        gn2 = D.law_threshold("gennorm", p, {"alpha": torch.tensor(0.3 * math.sqrt(2)), "beta": torch.tensor(2.0)})
        assert gn2.item() == pytest.approx(gaussian_threshold(0.3, p), rel=1e-6)
        gn1 = D.law_threshold("gennorm", p, {"alpha": torch.tensor(0.2), "beta": torch.tensor(1.0)})
        assert gn1.item() == pytest.approx(laplace_threshold(0.2, p), rel=1e-6)
        # On data drawn from the law, the fitted-law threshold is the empirical |x| quantile.
        emp = state_thresholds(h, torch.full((1, 4), p), "abs")[0].double()
        gn = f.thresholds(p, "gennorm")[0]
        assert torch.allclose(gn, emp, rtol=0.02)


def test_gammaincinv_matches_scipy():
    scipy_special = pytest.importorskip("scipy.special")
    a = torch.tensor([0.125, 0.5, 1.0, 1.43, 5.0, 20.0], dtype=torch.float64)
    p = torch.tensor([1e-4, 0.1, 0.5, 0.9, 0.99, 0.999], dtype=torch.float64)
    got = D.gammaincinv(a, p)
    want = torch.from_numpy(scipy_special.gammaincinv(a.numpy(), p.numpy()))
    assert torch.allclose(got, want, rtol=1e-8, atol=1e-300)


def test_pdf_integrates_to_one_and_cdf_agrees():
    x = torch.linspace(-30, 30, 600_001, dtype=torch.float64)
    for law, params in [("gaussian", {"sigma": 0.7}), ("laplace", {"b": 0.4}),
                        ("gennorm", {"alpha": torch.tensor(0.3), "beta": torch.tensor(0.8)})]:
        dens = D.pdf(law, x, params)
        assert torch.trapezoid(dens, x).item() == pytest.approx(1.0, abs=1e-4)
        inside = (x.abs() <= 0.5)
        assert torch.trapezoid(dens[inside], x[inside]).item() == pytest.approx(
            D.abs_cdf(law, torch.tensor(0.5), params).item(), abs=1e-4)


def test_empirical_density_and_rows(fits):
    h, f = fits
    edges = torch.linspace(-1, 1, 41)
    dens = D.empirical_density(h, 0, "attn_in", edges)
    # Gaussian(0.3) density at 0 is 1.33; the 0.05-wide bin around 0 is close to that.
    assert dens[19:21].mean().item() == pytest.approx(1 / (0.3 * math.sqrt(2 * math.pi)), rel=0.03)
    rows = f.rows()
    assert len(rows) == 4 and rows[1]["best"] == "laplace" and rows[0]["state"] == "attn_in"


def test_bad_inputs():
    with pytest.raises(ValueError):
        D.law_threshold("cauchy", 0.5, {})
    with pytest.raises(ValueError):
        D.law_threshold("laplace", 1.0, {"b": 1.0})
    with pytest.raises(ValueError):
        D.fit(Histograms.empty("empty", 1))


def test_sparsity_at_inverts_the_histogram_quantile(fits):
    h, f = fits
    for p in (0.1, 0.5, 0.9):
        t = state_thresholds(h, torch.full((1, 4), p), "abs")
        assert torch.allclose(D.sparsity_at(h, t), torch.full((1, 4), p, dtype=torch.float64), atol=1e-3)
    # A Gaussian-law threshold on Gaussian data gives the target; on Laplace data it does not.
    got = D.sparsity_at(h, f.thresholds(0.5, "gaussian"))[0]
    assert got[0].item() == pytest.approx(0.5, abs=0.01) and got[1].item() > 0.55
    assert D.sparsity_at(h, torch.full((1, 4), -1.0)).eq(0).all()


def test_fit_command_summary_and_arguments(fits):
    import argparse

    from teal_nb.commands import fit as fit_cmd

    _, f = fits
    s = fit_cmd.summary(f)
    assert s["attn_in"]["gaussian_better_layers"] == 1 and s["attn_out"]["laplace_better_layers"] == 1
    assert s["mlp_in"]["beta_median"] == pytest.approx(0.7, rel=0.03)
    p = argparse.ArgumentParser()
    fit_cmd.add_arguments(p)
    args = p.parse_args(["--model", "smollm2-135m", "--json"])
    assert args.json and args.model == "smollm2-135m" and args.sequences is None
