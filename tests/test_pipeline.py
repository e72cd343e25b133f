"""The whole pipeline on the embedded model: C4 calibration -> thresholds -> sparsify -> held-out text."""
import torch

from teal_nb.config import SITES
from teal_nb.data import c4_heldout, wikitext_samples
from teal_nb.sparsify import sparsify
from teal_nb.thresholds import table_for


def test_realized_sparsity_meets_the_target_on_heldout_text(smollm):
    model, tok = smollm
    table = table_for(model, tok, 0.5, progress=False)
    assert table.meta["refined"] == 1 and torch.all(table.sparsity == 0.5)
    for ids in (c4_heldout(tok, 4, 256, seed=7), wikitext_samples(tok, 4, 256, seed=7, split="validation")):
        with torch.no_grad(), sparsify(model, table, prefill="all") as sp:
            model(ids, use_cache=False)
            per_site = sp.realized().mean(0)
        for site, r in zip(SITES, per_site.tolist()):
            assert abs(r - 0.5) < 0.02, f"{site}: realized {r:.3f}"
