"""sparsify against the dense model (p = 0) and against an explicit masking reference (p > 0)."""
import pytest
import torch
from torch import nn

from teal_nb.config import SITES
from teal_nb.models import model_sites
from teal_nb.sparsify import ThresholdedLinear, sparsify
from teal_nb.thresholds import ThresholdTable
from tiny import tiny

IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))


def random_thresholds(model, scale=0.5):
    g = torch.Generator().manual_seed(1)
    return torch.rand(len(model_sites(model)), len(SITES), generator=g) * scale


def reference_logits(model, thresholds, ids):
    """Mask each projection's input by hand with forward pre-hooks, one linear at a time.

    Fused linears are split into one explicit F.linear per site so each part sees its own threshold.
    """
    handles = []
    for li, sites in enumerate(model_sites(model)):
        for name, site in sites.items():
            t = thresholds[li, SITES.index(name)].item()
            if site.rows == slice(None):
                handles.append(site.linear.register_forward_pre_hook(
                    lambda m, a, t=t: (torch.where(a[0].abs() > t, a[0], torch.zeros_like(a[0])),)))
    fused = {id(s.linear): [(n, s2) for n, s2 in sites.items() if s2.linear is s.linear]
             for sites in model_sites(model) for s in sites.values() if s.rows != slice(None)}
    originals = {}
    for li, sites in enumerate(model_sites(model)):
        for lin_id in {id(s.linear) for s in sites.values() if s.rows != slice(None)}:
            parts = [(thresholds[li, SITES.index(n)].item(), s) for n, s in fused[lin_id]]
            lin = parts[0][1].linear

            def fwd(x, parts=parts, lin=lin):
                return torch.cat([nn.functional.linear(torch.where(x.abs() > t, x, torch.zeros_like(x)),
                                                       lin.weight[s.rows]) for t, s in parts], -1)
            originals[lin] = lin.forward
            lin.forward = fwd
    try:
        with torch.no_grad():
            return model(ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
        for lin, f in originals.items():
            lin.forward = f


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_matches_explicit_masking(arch):
    model = tiny(arch)
    t = random_thresholds(model)
    with torch.no_grad(), sparsify(model, t, prefill="all") as sp:
        got = model(IDS, use_cache=False).logits
        realized = sp.realized()
    want = reference_logits(model, t, IDS)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (realized > 0).all()  # every site really was sparsified
    with torch.no_grad():
        dense = model(IDS, use_cache=False).logits
    assert (dense - got).abs().max() > 1e-3  # and that changed the output


def test_zero_sparsity_is_exactly_dense(smollm):
    model, tok = smollm
    ids = tok("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids
    with torch.no_grad():
        dense = model(ids).logits
        with sparsify(model, torch.full((30, 7), -1.0), prefill="all") as sp:
            sparse0 = model(ids).logits
            # Nothing is thresholded away; only entries that are exactly zero already count
            # (the Q4_1 embedding has some, so layer 0's attention input does).
            assert sp.realized()[1:].max().item() == 0.0
        after = model(ids).logits
    assert torch.equal(dense, sparse0) and torch.equal(dense, after)


def test_prefill_protocols_on_a_causal_model():
    model = tiny("llama")
    t = random_thresholds(model)
    with torch.no_grad():
        dense = model(IDS, use_cache=False).logits
        with sparsify(model, t, prefill="none"):
            none = model(IDS, use_cache=False).logits
        with sparsify(model, t, prefill="last_half"):
            half = model(IDS, use_cache=False).logits
    assert torch.equal(none, dense)
    # Causality: positions before the sparse half see only dense computation.
    assert torch.equal(half[:, :12], dense[:, :12])
    assert (half[:, 12:] - dense[:, 12:]).abs().max() > 1e-3


def test_decode_steps_are_sparse_even_with_dense_prefill():
    model = tiny("llama")
    t = random_thresholds(model)
    with torch.no_grad(), sparsify(model, t, prefill="none") as sp:
        out = model(IDS[:, :10], use_cache=True)
        assert sp.stats[..., 1].sum() == 0  # prefill: nothing sparsified
        model(IDS[:, 10:11], past_key_values=out.past_key_values, use_cache=True)
        r = sp.realized()
    assert not r.isnan().any() and (r > 0).all()


def test_remove_restores_modules_and_refuses_double_application():
    model = tiny("phi3")
    before = {n: m for n, m in model.named_modules()}
    handle = sparsify(model, random_thresholds(model))
    assert sum(isinstance(m, ThresholdedLinear) for m in model.modules()) == 2 * 4  # qkv, o, gate_up, down
    with pytest.raises(RuntimeError, match="already sparsified"):
        sparsify(model, random_thresholds(model))
    handle.remove()
    assert {n: m for n, m in model.named_modules()} == before


def test_bad_thresholds_are_refused():
    model = tiny("llama")
    with pytest.raises(ValueError, match=r"\[2, 7\]"):
        sparsify(model, torch.zeros(3, 7))
    with pytest.raises(ValueError, match="NaN"):
        sparsify(model, torch.full((2, 7), float("nan")))
    with pytest.raises(ValueError, match="prefill"):
        sparsify(model, torch.zeros(2, 7), prefill="first_half")
    table = ThresholdTable("another-model", torch.zeros(2, 7), torch.zeros(2, 7))
    with pytest.raises(ValueError, match="made for model 'another-model'"):
        sparsify(model, table)


def test_nan_inputs_propagate_instead_of_being_masked():
    lin = nn.Linear(4, 3)
    wrapped = ThresholdedLinear(lin, [(0, slice(None))], torch.tensor([0.5]), "all",
                                torch.zeros(7, 2, dtype=torch.long))
    y = wrapped(torch.tensor([[float("nan"), 0.1, 2.0, -3.0]]))
    assert torch.isnan(y).all()


def test_padded_batch_rows_are_sparse_over_their_own_last_half():
    """Right-padded rows of different lengths, with their lengths registered, give each row's
    single-request logits; a batch without registered lengths is refused in strict mode."""
    model = tiny("llama")
    t = random_thresholds(model)
    lengths = [24, 15, 7]
    batch = IDS[:1].repeat(3, 1).clone()
    for r, n in enumerate(lengths):
        batch[r, n:] = 0  # padding
    with torch.no_grad(), sparsify(model, t, prefill="last_half") as sp:
        singles = [model(IDS[:1, :n], use_cache=False).logits[0] for n in lengths]
        seen_single = sp.stats[..., 1].sum().item()
        sp.reset_stats()
        sp.set_row_lengths(lengths, batch.shape[1])
        got = model(batch, use_cache=False).logits
        assert sp.stats[..., 1].sum().item() == seen_single  # the same entries were sparse
        for r, n in enumerate(lengths):
            torch.testing.assert_close(got[r, :n], singles[r], rtol=1e-5, atol=1e-5)
        sp.set_row_lengths(None, strict=True)
        with pytest.raises(RuntimeError, match="row lengths"):
            model(batch, use_cache=False)
        model(batch[:1], use_cache=False)  # one row: its own last half, no lengths needed
