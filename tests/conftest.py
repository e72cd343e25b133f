"""Test settings: offline, Triton's CPU interpreter when there is no GPU, deterministic torch."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
