"""Site discovery on the layouts TEAL meets: separate, biased, fused; clear errors otherwise."""
import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from teal_nb.config import SITES, get_preset
from teal_nb.models import UnsupportedModel, model_sites, site_params
from tiny import tiny


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_separate_projections(arch):
    model = tiny(arch)
    sites = model_sites(model)
    assert len(sites) == 2 and list(sites[0]) == list(SITES)
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    assert sites[1]["q"].linear is attn.q_proj and sites[1]["v"].linear is attn.v_proj
    assert sites[1]["down"].linear is mlp.down_proj
    assert sites[1]["o"].state == "attn_out" and sites[1]["up"].state == "mlp_in"
    if arch == "qwen2":  # Qwen2's q/k/v carry biases; they stay with their sites
        assert sites[0]["k"].linear.bias is not None


def test_fused_projections():
    model = tiny("phi3")  # qkv_proj and gate_up_proj
    s = model_sites(model)[0]
    assert s["q"].linear is s["k"].linear is s["v"].linear
    hd = 64 // 4
    assert (s["q"].rows, s["k"].rows, s["v"].rows) == (slice(0, 64), slice(64, 64 + 2 * hd),
                                                       slice(64 + 2 * hd, 64 + 4 * hd))
    assert s["gate"].rows == slice(0, 96) and s["up"].rows == slice(96, 192)
    assert site_params(model) == {"q": 64 * 64, "k": 32 * 64, "v": 32 * 64, "o": 64 * 64,
                                  "gate": 96 * 64, "up": 96 * 64, "down": 64 * 96}


def test_unknown_architecture_names_what_it_found():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModel, match="GPT2LMHeadModel.*transformer"):
        model_sites(model)


def test_layer_without_a_site_is_refused():
    model = tiny("llama")
    del model.model.layers[0].mlp.up_proj
    with pytest.raises(UnsupportedModel, match=r"'up'\].*mlp.gate_proj"):
        model_sites(model)


def test_embedded_model_sites(smollm):
    model, _ = smollm
    p = get_preset("smollm2-135m")
    assert len(model_sites(model)) == p.n_layers
    assert site_params(model) == {s: p.site_params(s) for s in SITES}
    assert model.config.hidden_size == p.hidden and model.config.intermediate_size == p.intermediate


def test_preset_shapes_match_transformers_configs():
    from teal_nb.models import random_model

    m = random_model("llama-3-8b", dtype="float32", device="meta", n_layers=1)
    s = model_sites(m)[0]
    p = get_preset("llama-3-8b")
    for site in SITES:
        lin = s[site].linear
        assert (lin.out_features, lin.in_features) == p.site_shape(site)
    with pytest.raises(KeyError, match="unknown preset"):
        get_preset("gpt-5")
