"""The committed Colab notebooks are exactly the chapters (plus the install cell)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_colab_notebooks_match_the_chapters():
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "colab.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    chapters = {p.stem for p in (ROOT / "book").glob("0*.md")}
    assert chapters and chapters == {p.stem for p in (ROOT / "colab").glob("*.ipynb")}
