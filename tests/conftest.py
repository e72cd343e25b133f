"""Test settings: offline, Triton's CPU interpreter when there is no GPU, deterministic torch."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The team's data beside the repo, as the Makefile sets it (tests that need data use it).
_shared = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
if "TEAL_DATA_DIR" not in os.environ and os.path.isdir(_shared):
    os.environ["TEAL_DATA_DIR"] = os.path.abspath(_shared)

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Must be set before any @triton.jit kernel is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm():
    """The embedded model (fp32, CPU) and its tokenizer, loaded once per test session."""
    from teal_nb.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
