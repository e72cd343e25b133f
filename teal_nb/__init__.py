"""teal_nb: TEAL (training-free activation sparsity for LLMs), implemented and measured.

    model, tok = teal_nb.load_model("smollm2-135m")
    table = teal_nb.calibrate_thresholds(model, tok, sparsity=0.5)
    with teal_nb.sparsify(model, table):
        ...

Heavy or optional dependencies (datasets, lm-eval, gguf, triton, matplotlib) are imported lazily.
"""
__version__ = "0.1.0"

from .config import PRESETS, SITES, HIDDEN_STATES, SITE_STATE, get_preset  # noqa: F401
from .models import load_model, random_model, model_sites  # noqa: F401
