"""Tiny random Llama-family models built from transformers configs (no weights needed)."""
import torch
from transformers import AutoConfig, AutoModelForCausalLM

SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, pad_token_id=0)


def tiny(arch: str = "llama", **overrides):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(arch, **{**SHAPE, **overrides})
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.teal_name = f"tiny-{arch}"
    return model
