"""Result records with provenance: what was measured, on what, by which code, when."""
from __future__ import annotations

import datetime as _dt
import json
import platform
import subprocess
import sys
from pathlib import Path


def git_sha(root: str | Path | None = None) -> str:
    root = root or Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance(command: str | None = None) -> dict:
    import torch

    out = {"git_sha": git_sha(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "command": command or " ".join(sys.argv), "python": platform.python_version(),
           "torch": torch.__version__, "host_cpu": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads()}
    try:
        import transformers
        out["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        out["device"] = torch.cuda.get_device_name()
        out["cuda"] = torch.version.cuda
    else:
        out["device"] = "cpu"
    from . import __version__
    out["teal_nb"] = __version__
    return out


def write_json(path: str | Path, obj: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float) + "\n")
    tmp.replace(path)
