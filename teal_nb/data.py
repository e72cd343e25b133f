"""Calibration text (C4) and evaluation text (WikiText-2 raw), local first, hub second.

Local files follow the layout of the team's `shared/data` (see its PROVENANCE.md):
    $TEAL_DATA_DIR/c4/c4_en_validation_2k.jsonl
    $TEAL_DATA_DIR/wikitext2/wiki.{test,valid}.raw
Without TEAL_DATA_DIR the same data comes from the HF hub (`allenai/c4`, `Salesforce/wikitext`).

Samplers are seeded: the same (tokenizer, n, length, seed) always gives the same token windows.
"""
from __future__ import annotations

import functools
import gzip
import json
import os
from pathlib import Path

import torch

C4_FILE = "c4/c4_en_validation_2k.jsonl"
WIKITEXT_FILES = {"test": "wikitext2/wiki.test.raw", "validation": "wikitext2/wiki.valid.raw"}


class DataUnavailable(FileNotFoundError):
    pass


def data_dir() -> Path | None:
    d = os.environ.get("TEAL_DATA_DIR")
    return Path(d) if d else None


def _local(rel: str) -> Path | None:
    d = data_dir()
    if d is None:
        return None
    path = d / rel
    if not path.exists():
        raise DataUnavailable(f"TEAL_DATA_DIR={d} has no {rel}; it must follow the layout of shared/data "
                              "(see data/README.md)")
    return path


def _offline() -> bool:
    return os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"


def _hub(what: str, *args, **kwargs):
    if _offline():
        raise DataUnavailable(
            f"{what} is not available offline: set TEAL_DATA_DIR to a folder laid out like shared/data "
            f"(e.g. TEAL_DATA_DIR=../shared/data), or go online (unset HF_HUB_OFFLINE and "
            f"HF_DATASETS_OFFLINE) to read it from the Hugging Face hub")
    try:
        import datasets
    except ImportError as e:
        raise DataUnavailable(f"{what}: no TEAL_DATA_DIR and the `datasets` package is not installed "
                              "(pip install datasets)") from e
    return datasets.load_dataset(*args, **kwargs)


def read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@functools.lru_cache(maxsize=4)
def c4_texts(n_docs: int = 2000) -> tuple[str, ...]:
    """C4 English validation documents (TEAL's calibration source)."""
    path = _local(C4_FILE)
    if path is not None:
        return tuple(row["text"] for row in read_jsonl(path)[:n_docs])
    ds = _hub("C4", "allenai/c4", "en", split="validation", streaming=True)
    return tuple(row["text"] for _, row in zip(range(n_docs), ds))


@functools.lru_cache(maxsize=4)
def wikitext_rows(split: str = "test") -> tuple[str, ...]:
    """WikiText-2 raw rows exactly as HF `Salesforce/wikitext` wikitext-2-raw-v1 gives them."""
    if split not in WIKITEXT_FILES:
        raise ValueError(f"WikiText-2 split must be one of {list(WIKITEXT_FILES)}, got {split!r}")
    path = _local(WIKITEXT_FILES[split])
    if path is not None:
        raw = path.read_text(encoding="utf-8")
        # The HF line-level builder keeps non-blank lines with their newline and blank lines as "".
        return tuple(line + "\n" if line.strip() else "" for line in raw.split("\n")[:-1])
    return tuple(_hub("WikiText-2", "Salesforce/wikitext", "wikitext-2-raw-v1", split=split)["text"])


def wikitext_text(split: str = "test") -> str:
    """The evaluation text as the GPTQ/TEAL perplexity scripts build it: rows joined by blank lines."""
    return "\n\n".join(wikitext_rows(split))


def _tokenize(tok, text: str) -> torch.Tensor:
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


@functools.lru_cache(maxsize=8)
def _wikitext_ids(tok, split: str) -> torch.Tensor:
    return _tokenize(tok, wikitext_text(split))


# The last C4 documents are never used for calibration: held-out text of the same distribution.
C4_HELDOUT_DOCS = 400


@functools.lru_cache(maxsize=8)
def _c4_ids(tok, n_docs: int, seed: int, heldout: bool = False) -> torch.Tensor:
    docs = list(c4_texts(n_docs))
    docs = docs[-C4_HELDOUT_DOCS:] if heldout else docs[:-C4_HELDOUT_DOCS]
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    sep = tok.eos_token or "\n\n"
    return _tokenize(tok, sep.join(docs[i] for i in order))


def random_windows(ids: torch.Tensor, n: int, length: int, seed: int) -> torch.Tensor:
    """`n` windows of `length` tokens at seeded random offsets of a token stream: [n, length]."""
    if n < 1 or length < 2:
        raise ValueError(f"need n >= 1 windows of length >= 2, got n={n}, length={length}")
    if ids.numel() <= length:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {length}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length, (n,), generator=g)
    return torch.stack([ids[s:s + length] for s in starts.tolist()])


def c4_calibration(tok, n: int, length: int, seed: int = 0, n_docs: int = 2000) -> torch.Tensor:
    """Calibration batch: `n` random windows of `length` tokens from shuffled C4 documents."""
    return random_windows(_c4_ids(tok, n_docs, seed), n, length, seed)


def c4_heldout(tok, n: int, length: int, seed: int = 0, n_docs: int = 2000) -> torch.Tensor:
    """Windows from the C4 documents that calibration never sees (the last C4_HELDOUT_DOCS)."""
    return random_windows(_c4_ids(tok, n_docs, seed, heldout=True), n, length, seed)


def wikitext_samples(tok, n: int = 128, length: int = 2048, seed: int = 0,
                     split: str = "test") -> torch.Tensor:
    """The perplexity protocol's samples: `n` seeded random windows of `length` tokens of WikiText-2."""
    return random_windows(_wikitext_ids(tok, split), n, length, seed)
