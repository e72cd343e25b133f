"""Data sources (local files, clear errors offline) and the perplexity protocol against HF's own loss."""
import json
import math

import pytest
import torch

from teal_nb import data
from teal_nb.evaluate import perplexity


def test_wikitext_rows_match_the_hub_split_sizes():
    assert len(data.wikitext_rows("test")) == 4358 and len(data.wikitext_rows("validation")) == 3760
    assert data.wikitext_rows("test")[1] == " = Robert Boulter = \n"


def test_samplers_are_seeded_and_heldout_is_disjoint(smollm):
    _, tok = smollm
    a, b = data.c4_calibration(tok, 3, 64, seed=5), data.c4_calibration(tok, 3, 64, seed=5)
    assert torch.equal(a, b) and a.shape == (3, 64)
    assert not torch.equal(a, data.c4_calibration(tok, 3, 64, seed=6))
    docs = data.c4_texts()
    assert not set(docs[:-data.C4_HELDOUT_DOCS]) & set(docs[-data.C4_HELDOUT_DOCS:])
    assert torch.equal(data.wikitext_samples(tok, 2, 128, seed=1), data.wikitext_samples(tok, 2, 128, seed=1))


def test_missing_data_offline_says_what_to_set(monkeypatch):
    monkeypatch.delenv("TEAL_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data.c4_texts.cache_clear()
    data.wikitext_rows.cache_clear()
    with pytest.raises(data.DataUnavailable, match="TEAL_DATA_DIR"):
        data.c4_texts()
    with pytest.raises(data.DataUnavailable, match="TEAL_DATA_DIR"):
        data.wikitext_rows("test")
    data.c4_texts.cache_clear()
    data.wikitext_rows.cache_clear()


def test_data_dir_with_wrong_layout(monkeypatch, tmp_path):
    monkeypatch.setenv("TEAL_DATA_DIR", str(tmp_path))
    data.c4_texts.cache_clear()
    with pytest.raises(data.DataUnavailable, match="c4/c4_en_validation_2k.jsonl"):
        data.c4_texts()
    data.c4_texts.cache_clear()
    with pytest.raises(ValueError, match="split"):
        data.wikitext_rows("train")


def test_perplexity_equals_hf_loss_when_every_token_is_scored(smollm):
    model, tok = smollm
    ours = perplexity(model, tok, samples=2, seq_len=128, eval_len=127, seed=3, progress=False)
    windows = data.wikitext_samples(tok, 2, 128, seed=3)
    with torch.no_grad():
        hf = [model(w[None], labels=w[None]).loss.item() for w in windows]
    assert ours["nll"] == pytest.approx(sum(hf) / 2, rel=1e-5)
    assert ours["ppl"] == pytest.approx(math.exp(sum(hf) / 2), rel=1e-5)
    assert ours["protocol"] == {"data": "wikitext-2-raw-v1/test", "samples": 2, "seq_len": 128,
                                "eval_len": 127, "seed": 3}


def test_ppl_cli_json_and_bad_sparsity(capsys):
    from teal_nb.cli import main

    assert main(["ppl", "--sparsity", "1.0", "--quiet"]) == 2
    assert "[0, 1)" in capsys.readouterr().err
    assert main(["ppl", "--sparsity", "0", "--samples", "1", "--seq-len", "96", "--eval-len", "32",
                 "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["model"] == "smollm2-135m" and out["protocol"]["prefill"] == "last_half"
    assert out["realized_sparsity"]["down"] == 0.0 and 1 < out["ppl"] < 1000
    assert out["provenance"]["git_sha"]
