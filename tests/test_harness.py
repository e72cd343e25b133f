"""The lm-eval bridge: offline tasks equal the harness's built-in tasks; sparsity reaches the harness.

The reference in every comparison is the harness's *built-in* YAML, loaded here straight from
the installed lm_eval (no teal_nb code), given the local documents in the hub dataset's schema.
"""
import gzip
import json
import os
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")
datasets = pytest.importorskip("datasets")

REPO = Path(__file__).resolve().parent.parent
N_DOCS = 4  # documents compared per task


@pytest.fixture(scope="module", autouse=True)
def local_data():
    """TEAL_DATA_DIR, else the team's ../shared/data beside the repo; skip when neither exists."""
    d = os.environ.get("TEAL_DATA_DIR") or str(REPO.parent / "shared" / "data")
    if not (Path(d) / "tasks").is_dir():
        pytest.skip("no local task data (set TEAL_DATA_DIR to a folder laid out like shared/data)")
    old = os.environ.get("TEAL_DATA_DIR")
    os.environ["TEAL_DATA_DIR"] = d
    datasets.disable_progress_bars()
    yield Path(d) / "tasks"
    if old is None:
        os.environ.pop("TEAL_DATA_DIR", None)
    else:
        os.environ["TEAL_DATA_DIR"] = old


def _raw(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _reference(yaml_rel: str, splits: dict[str, list[dict]]):
    """The harness's built-in task, unchanged except that its documents are `splits`."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / yaml_rel, resolve_func=True)
    for key in ("tag", "group", "task_list"):
        cfg.pop(key, None)
    for key in ("training_split", "validation_split", "test_split", "fewshot_split"):
        if cfg.get(key) is not None and cfg[key] not in splits:
            cfg[key] = None
    cfg["custom_dataset"] = lambda **_: datasets.DatasetDict(
        {s: datasets.Dataset.from_list(rows) for s, rows in splits.items()})
    return ConfigurableTask(config=cfg)


def _ours(name: str):
    from teal_nb.tasks import build_tasks

    tasks = build_tasks([name], offline=True)
    assert list(tasks) == [name]
    return tasks[name]


def _rendered(task, doc) -> dict:
    out = {"text": task.doc_to_text(doc), "target": task.doc_to_target(doc)}
    if task.OUTPUT_TYPE == "multiple_choice":
        out["choices"] = task.doc_to_choice(doc)
    return out


def _compare(ours, ref, n=N_DOCS):
    ours_docs, ref_docs = list(ours.eval_docs), list(ref.eval_docs)
    assert len(ours_docs) == len(ref_docs)
    for a, b in zip(ours_docs[:n], ref_docs[:n]):
        assert a == b
        assert _rendered(ours, a) == _rendered(ref, b)
    assert ours.OUTPUT_TYPE == ref.OUTPUT_TYPE
    assert ours.config.metric_list == ref.config.metric_list
    assert ours.config.generation_kwargs == ref.config.generation_kwargs
    assert ours.config.filter_list == ref.config.filter_list


# task, built-in YAML, {split: local file}: local files already in the hub dataset's schema
SAME_SCHEMA = [
    ("piqa", "piqa/piqa.yaml", {"validation": "piqa_validation.jsonl"}),
    ("hellaswag", "hellaswag/hellaswag.yaml", {"validation": "hellaswag_validation.jsonl.gz"}),
    ("winogrande", "winogrande/default.yaml", {"validation": "winogrande_xl_validation.jsonl"}),
    ("lambada_openai", "lambada/lambada_openai.yaml", {"test": "lambada_openai_test.jsonl"}),
    ("gsm8k", "gsm8k/gsm8k.yaml", {"test": "gsm8k_test.jsonl", "train": "gsm8k_train.jsonl.gz"}),
]


@pytest.mark.parametrize("name,yaml_rel,files", SAME_SCHEMA, ids=[t[0] for t in SAME_SCHEMA])
def test_offline_task_equals_builtin(local_data, name, yaml_rel, files):
    ref = _reference(yaml_rel, {s: _raw(local_data / f) for s, f in files.items()})
    _compare(_ours(name), ref)


def test_gsm8k_fewshot_prompt_equals_builtin(local_data):
    """The 5-shot prompt (exemplars drawn from the local train split) is the built-in task's."""
    files = {"test": "gsm8k_test.jsonl", "train": "gsm8k_train.jsonl.gz"}
    ref = _reference("gsm8k/gsm8k.yaml", {s: _raw(local_data / f) for s, f in files.items()})
    ours = _ours("gsm8k")
    ours.set_fewshot_seed(1234)
    ref.set_fewshot_seed(1234)
    doc = list(ours.eval_docs)[0]
    a, b = ours.fewshot_context(doc, num_fewshot=5), ref.fewshot_context(doc, num_fewshot=5)
    assert a == b and a.count("Question:") == 6


def test_mmlu_subject_equals_builtin(local_data):
    rows = {s: [r for r in _raw(local_data / f"mmlu_{s}.jsonl") if r["subject"] == "anatomy"]
            for s in ("test", "dev", "validation")}
    assert len(rows["test"]) == 135  # the known size of MMLU anatomy / test
    _compare(_ours("mmlu_anatomy"), _reference("mmlu/default/mmlu_anatomy.yaml", rows))


@pytest.mark.parametrize("name", ["arc_easy", "arc_challenge"])
def test_arc_from_olmes_docs_renders_olmes_prompt(local_data, name):
    """ARC test docs come as OLMES renderings: the built-in task's processing of our converted
    docs must give back exactly OLMES's query, choices and gold index."""
    olmes = _raw(local_data / f"{name}_test.olmes_docs.jsonl")
    ours = _ours(name)
    docs = list(ours.eval_docs)
    assert len(docs) == len(olmes) == {"arc_easy": 2376, "arc_challenge": 1172}[name]
    ref = _reference(f"arc/{name}.yaml", {"test": docs})
    for doc, o in zip(docs[:N_DOCS] + docs[-N_DOCS:], olmes[:N_DOCS] + olmes[-N_DOCS:]):
        assert _rendered(ours, doc) == _rendered(ref, doc) == {
            "text": o["query"], "target": o["gold"], "choices": o["choices"]}


def test_boolq_label_convention(local_data):
    """Local BoolQ is the `boolq` hub set (answer: bool); the harness reads SuperGLUE (label, choices no/yes)."""
    raw = _raw(local_data / "boolq_validation.jsonl")
    ours = _ours("boolq")
    docs = list(ours.eval_docs)
    assert len(docs) == len(raw) == 3270
    for doc, r in zip(docs[:N_DOCS * 4], raw[:N_DOCS * 4]):
        choices, target = ours.doc_to_choice(doc), ours.doc_to_target(doc)
        assert choices[target] == ("yes" if r["answer"] else "no")
        assert ours.doc_to_text(doc) == f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:"
    sg = [{"question": r["question"], "passage": r["passage"], "idx": i, "label": int(r["answer"])}
          for i, r in enumerate(raw)]
    _compare(ours, _reference("super_glue/boolq/default.yaml", {"validation": sg}))


def test_unknown_task_and_missing_data(monkeypatch, tmp_path):
    from teal_nb.data import DataUnavailable
    from teal_nb.tasks import offline_config, task_specs

    with pytest.raises(KeyError, match="no offline definition"):
        offline_config("not_a_task")
    monkeypatch.setenv("TEAL_DATA_DIR", str(tmp_path))
    from teal_nb.tasks import load_local

    with pytest.raises(DataUnavailable, match="piqa_validation.jsonl is missing"):
        load_local("piqa")
    monkeypatch.delenv("TEAL_DATA_DIR")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataUnavailable, match="TEAL_DATA_DIR"):
        task_specs(["piqa"])


# ---------------------------------------------------------------- end to end on the embedded model

@pytest.fixture(scope="module")
def dense_piqa(smollm):
    from teal_nb.harness import evaluate_tasks

    model, tok = smollm
    return evaluate_tasks(model, tok, ["piqa"], limit=3, log_samples=True)


def _table(value: float, model):
    import torch

    from teal_nb.models import decoder_layers

    return torch.full((len(decoder_layers(model)), 7), value)


def test_bridge_dense_equals_sparsify_at_p0(smollm, dense_piqa):
    """Thresholds of p = 0 (what `thresholds` gives: -1, keep everything) change no log-likelihood."""
    from teal_nb.harness import evaluate_tasks, loglikelihoods

    model, tok = smollm
    sparse = evaluate_tasks(model, tok, ["piqa"], table=_table(-1.0, model), prefill="all", limit=3,
                            log_samples=True)
    assert loglikelihoods(sparse, "piqa") == loglikelihoods(dense_piqa, "piqa")
    assert len(loglikelihoods(sparse, "piqa")) == 3
    t = sparse["tasks"]["piqa"]
    assert t["sparse"] and t["realized_sparsity"]["entries_seen"] > 0
    assert t["realized_sparsity"]["all"] < 1e-3, t["realized_sparsity"]  # only entries that are exactly 0
    assert dense_piqa["tasks"]["piqa"]["metrics"]["acc_stderr"] > 0


def test_bridge_protocols(smollm, dense_piqa):
    """p > 0: `last_half` changes the scores; `none` leaves a prefill-only task dense and says so."""
    from teal_nb.harness import NOT_SPARSE_WARNING, evaluate_tasks, loglikelihoods

    model, tok = smollm
    table = _table(0.05, model)
    half = evaluate_tasks(model, tok, ["piqa"], table=table, prefill="last_half", limit=3, log_samples=True)
    assert half["batch_size"] == 1 and half["prefill"] == "last_half"
    assert half["tasks"]["piqa"]["realized_sparsity"]["all"] > 0
    assert loglikelihoods(half, "piqa") != loglikelihoods(dense_piqa, "piqa")
    # batched: the harness right-pads requests of different lengths; each row is sparse over its own
    # last half, so the same entries are sparsified and the scores match one request at a time
    batched = evaluate_tasks(model, tok, ["piqa"], table=table, prefill="last_half", limit=3, log_samples=True,
                             batch_size=4)
    assert batched["batch_size"] == 4
    assert (batched["tasks"]["piqa"]["realized_sparsity"]["entries_seen"]
            == half["tasks"]["piqa"]["realized_sparsity"]["entries_seen"])
    for got, want in zip(loglikelihoods(batched, "piqa"), loglikelihoods(half, "piqa")):
        assert got == pytest.approx(want, abs=1e-3)
    none = evaluate_tasks(model, tok, ["piqa"], table=table, prefill="none", limit=3, log_samples=True)
    assert loglikelihoods(none, "piqa") == loglikelihoods(dense_piqa, "piqa")
    assert none["tasks"]["piqa"]["warning"] == NOT_SPARSE_WARNING and not none["tasks"]["piqa"]["sparse"]
    assert none["tasks"]["piqa"]["realized_sparsity"]["entries_seen"] == 0
    # the model is back to dense afterwards
    from teal_nb.sparsify import ThresholdedLinear

    assert not any(isinstance(m, ThresholdedLinear) for m in model.modules())
