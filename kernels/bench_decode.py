"""GPU lab driver: the end-to-end decode sweep of issue 6, recorded to kernels/results/<gpu>/decode.json.

    python kernels/bench_decode.py --out kernels/results/h200/decode.json

Same arguments as `teal-nb bench-decode` (it runs that command's module directly, without the
CLI registry, so that nothing but torch, Triton and transformers needs to be importable).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from teal_nb.commands import bench_decode  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="bench_decode.py", description=bench_decode.HELP)
    bench_decode.add_arguments(parser)
    sys.exit(bench_decode.run(parser.parse_args()) or 0)
