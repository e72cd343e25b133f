"""Offline twins of lm-evaluation-harness tasks: the harness's own task configs, local documents.

TEAL scores downstream accuracy with EleutherAI's harness. Copying its prompts by hand drifts
from it, so for every task we load the harness's *built-in* YAML from the installed `lm_eval`
(prompt template, choices, target, `process_docs`, metrics, filters, generation settings, its
`!function` helpers) and replace only where the documents come from: a `custom_dataset` loader
that reads `$TEAL_DATA_DIR/tasks` (the layout of the team's `shared/data`, see its PROVENANCE.md)
and returns the splits under the names the built-in config asks for.

Two local files are not in the hub dataset's schema, and their loaders convert rows back to it,
so that the harness's own `doc_to_text` / `doc_to_choice` / `doc_to_target` apply unchanged:
  - ARC test: AI2 OLMES docs (`query`, `choices`, `gold`) -> `question`, `choices{text,label}`,
    `answerKey`. The original letter labels are lost; labels A, B, C... keep the gold index.
  - BoolQ: the `boolq` hub dataset (`answer` bool) -> SuperGLUE's schema (`label` 0 = False /
    1 = True, `idx`), which the harness's `boolq` task reads.
MMLU is one concatenated file per split with a `subject` field; each `mmlu_<subject>` task keeps
the rows of its subject, and `mmlu` is the harness's size-weighted group over the 57 subjects.

Splits with no local file are switched off (e.g. `training_split` of PIQA), which only matters
for few-shot evaluation: the harness then draws exemplars from the validation split.

    from teal_nb.tasks import task_specs
    specs = task_specs(["piqa", "arc_easy"])   # config dicts offline, plain names online
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from ..data import DataUnavailable, _offline, data_dir, read_jsonl

SPLIT_KEYS = {"training_split": "train", "validation_split": "validation", "test_split": "test"}


# ---------------------------------------------------------------- row converters (local -> hub schema)

def olmes_to_arc(row: dict) -> dict:
    """An OLMES ARC doc back in `allenai/ai2_arc` form (letter labels A.. in place of the lost originals)."""
    query = row["query"]
    prefix, suffix = "Question: ", "\nAnswer:"
    if not (query.startswith(prefix) and query.endswith(suffix)):
        raise ValueError(f"unexpected OLMES ARC query for {row.get('id')}: {query[:60]!r}")
    labels = [chr(ord("A") + i) for i in range(len(row["choices"]))]
    return {"id": row["id"], "question": query[len(prefix):-len(suffix)],
            "choices": {"text": list(row["choices"]), "label": labels},
            "answerKey": labels[int(row["gold"])]}


def boolq_to_superglue(row: dict, idx: int) -> dict:
    """A `boolq` hub row in `super_glue/boolq` form: label 1 means the answer is True ("yes")."""
    return {"question": row["question"], "passage": row["passage"], "idx": idx,
            "label": int(bool(row["answer"]))}


# ---------------------------------------------------------------- the registry

@dataclass(frozen=True)
class LocalTask:
    """A harness task and the local files its splits come from."""
    name: str                         # the harness's task name (results keep it)
    yaml: str                         # the built-in config, relative to lm_eval/tasks
    files: dict[str, str]             # split name -> file under $TEAL_DATA_DIR/tasks
    convert: dict[str, str] = field(default_factory=dict)  # split -> converter name
    subject: str | None = None        # MMLU: keep rows of this subject


MMLU_FILES = {"test": "mmlu_test.jsonl", "dev": "mmlu_dev.jsonl", "validation": "mmlu_validation.jsonl"}

TASKS: dict[str, LocalTask] = {t.name: t for t in [
    LocalTask("piqa", "piqa/piqa.yaml", {"validation": "piqa_validation.jsonl"}),
    LocalTask("arc_easy", "arc/arc_easy.yaml",
              {"test": "arc_easy_test.olmes_docs.jsonl", "validation": "arc_easy_validation.jsonl"},
              {"test": "olmes_to_arc"}),
    LocalTask("arc_challenge", "arc/arc_challenge.yaml",
              {"test": "arc_challenge_test.olmes_docs.jsonl", "validation": "arc_challenge_validation.jsonl"},
              {"test": "olmes_to_arc"}),
    LocalTask("hellaswag", "hellaswag/hellaswag.yaml", {"validation": "hellaswag_validation.jsonl.gz"}),
    LocalTask("winogrande", "winogrande/default.yaml", {"validation": "winogrande_xl_validation.jsonl"}),
    LocalTask("boolq", "super_glue/boolq/default.yaml", {"validation": "boolq_validation.jsonl"},
              {"validation": "boolq_to_superglue"}),
    LocalTask("gsm8k", "gsm8k/gsm8k.yaml", {"test": "gsm8k_test.jsonl", "train": "gsm8k_train.jsonl.gz"}),
    LocalTask("lambada_openai", "lambada/lambada_openai.yaml", {"test": "lambada_openai_test.jsonl"}),
]}
GROUPS = ("mmlu",)


def harness_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def mmlu_subjects() -> list[str]:
    return sorted(p.stem[len("mmlu_"):] for p in (harness_tasks_dir() / "mmlu" / "default").glob("mmlu_*.yaml"))


def local_task(name: str) -> LocalTask:
    if name in TASKS:
        return TASKS[name]
    if name.startswith("mmlu_") and name[len("mmlu_"):] in mmlu_subjects():
        return LocalTask(name, f"mmlu/default/{name}.yaml", MMLU_FILES, subject=name[len("mmlu_"):])
    known = ", ".join([*TASKS, *GROUPS, "mmlu_<subject>"])
    raise KeyError(f"no offline definition for task {name!r}; offline tasks: {known}")


# ---------------------------------------------------------------- loading documents

@functools.lru_cache(maxsize=32)
def _rows(path: str) -> tuple[dict, ...]:
    return tuple(read_jsonl(Path(path)))


def task_dir() -> Path:
    d = data_dir()
    if d is None:
        raise DataUnavailable("offline tasks need TEAL_DATA_DIR (a folder laid out like shared/data)")
    return d / "tasks"


def split_rows(task: LocalTask, split: str) -> list[dict]:
    """The documents of one split, in the hub dataset's schema, in file order."""
    path = task_dir() / task.files[split]
    if not path.exists():
        raise DataUnavailable(f"{path} is missing: TEAL_DATA_DIR must follow the layout of shared/data "
                              "(see its PROVENANCE.md)")
    rows = _rows(str(path))
    if task.subject is not None:
        rows = [r for r in rows if r["subject"] == task.subject]
    conv = task.convert.get(split)
    if conv == "olmes_to_arc":
        return [olmes_to_arc(r) for r in rows]
    if conv == "boolq_to_superglue":
        return [boolq_to_superglue(r, i) for i, r in enumerate(rows)]
    if conv is not None:
        raise ValueError(f"unknown converter {conv!r}")
    return [dict(r) for r in rows]


def load_local(teal_task: str, **_ignored):
    """`custom_dataset` for the harness: a DatasetDict of the task's local splits.

    The harness calls it with the task's metadata and dataset_kwargs as keywords; only
    `teal_task` is ours, the rest is ignored.
    """
    import datasets

    task = local_task(teal_task)
    return datasets.DatasetDict({split: datasets.Dataset.from_list(split_rows(task, split))
                                 for split in task.files})


# ---------------------------------------------------------------- configs for the harness

def builtin_config(name: str) -> dict:
    """The harness's own config of a task, `include:` and `!function` resolved, unchanged."""
    from lm_eval.tasks._yaml_loader import load_yaml

    path = harness_tasks_dir() / local_task(name).yaml
    if not path.exists():
        raise FileNotFoundError(f"the installed lm_eval has no {path}: this lm_eval version is not supported")
    cfg = load_yaml(path, resolve_func=True)
    for key in ("tag", "group", "task_list"):
        cfg.pop(key, None)
    return cfg


def offline_config(name: str) -> dict:
    """The built-in config with its documents redirected to the local files (nothing else changed)."""
    task = local_task(name)
    cfg = builtin_config(name)
    cfg["task"] = name
    cfg["custom_dataset"] = load_local
    cfg["dataset_kwargs"] = {"teal_task": name}
    cfg["dataset_path"] = f"local:{task_dir() / task.files.get(next(iter(task.files)))}"
    cfg["dataset_name"] = task.subject
    for key, default in SPLIT_KEYS.items():
        split = cfg.get(key)
        if split is not None and split not in task.files:
            cfg[key] = None  # no local copy of this split (only few-shot sampling would read it)
    fs = cfg.get("fewshot_split")
    if fs is not None and fs not in task.files:
        cfg["fewshot_split"] = None
    cfg["metadata"] = {**(cfg.get("metadata") or {}),
                       "teal_offline": {"files": {s: str(task_dir() / f) for s, f in task.files.items()},
                                        "converted": dict(task.convert), "subject": task.subject}}
    return cfg


def offline_group(name: str) -> dict:
    """MMLU: the harness's aggregate (accuracy weighted by subject size) over the 57 offline subjects."""
    if name != "mmlu":
        raise KeyError(name)
    return {"group": "mmlu", "task": [offline_config(f"mmlu_{s}") for s in mmlu_subjects()],
            "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
            "metadata": {"version": 2}}


def is_offline() -> bool:
    """Documents come from TEAL_DATA_DIR when it is set; else from the hub (unless HF is offline)."""
    if data_dir() is not None:
        return True
    if _offline():
        raise DataUnavailable(
            "lm-eval tasks are not available offline: set TEAL_DATA_DIR to a folder laid out like "
            "shared/data (e.g. TEAL_DATA_DIR=../shared/data), or go online (unset HF_HUB_OFFLINE and "
            "HF_DATASETS_OFFLINE) to use the harness's built-in tasks from the hub")
    return False


def task_specs(names: list[str], offline: bool | None = None) -> list:
    """What to hand the harness for each task: an offline config dict, or (online) the plain name."""
    offline = is_offline() if offline is None else offline
    if not offline:
        return list(names)
    return [offline_group(n) if n in GROUPS else offline_config(n) for n in names]


def task_manager(offline: bool):
    """A TaskManager; offline it skips indexing the ~14k built-in tasks (about 11 s)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=not offline)


def build_tasks(names: list[str], offline: bool | None = None) -> dict:
    """{name: Task} as the harness builds them (for inspection and tests)."""
    offline = is_offline() if offline is None else offline
    return task_manager(offline).load(task_specs(names, offline))["tasks"]


__all__ = ["TASKS", "GROUPS", "LocalTask", "task_specs", "offline_config", "builtin_config", "build_tasks",
           "load_local", "olmes_to_arc", "boolq_to_superglue", "mmlu_subjects", "is_offline"]
