"""GPU lab driver: the end-to-end decode sweep of issue 6, recorded to kernels/results/<gpu>/decode.json.

    python kernels/bench_decode.py --out kernels/results/h200/decode.json

Same arguments as `teal-nb bench-decode` (it only calls that command), kept here beside the
other drivers of the GPU lab so that one file names the recorded run.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from teal_nb.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench-decode", *sys.argv[1:]]))
