"""When each program of one sparse GEMV launch starts, waits, streams and ends, on one GPU.

    PYTHONPATH=. python kernels/gemv_timeline.py --out $OUT/gemv_timeline.json

The record's per-shape times fit a line in the kept fraction: the part that falls with s streams
the kept rows at 4.3-4.7 TB/s, and 3.6-7.0 us per launch do not fall with s (kernels/README.md,
after item 22). This says where that second part is. For each shape (sparse_gemv_into with the
package's config) and sparsity, one launch in the middle of a CUDA graph of back-to-back
launches over rotating weight copies (the bench's setting) writes, per program, the GPU's
global timer and its SM's cycle counter at five points (gemv._stamp): 0 entry (with PDL, before
the wait for the launch before), 1 that wait over, 2 the kept list stored, 3 the last W row
arrived and summed, 4 the epilogue's atomics issued; and its SM. Printed last, in us from the
first program's wait: the spread of the programs' starts, the serial chain (1 -> 2: x, the
prefix sum, the list), the streaming (2 -> 3), and the tail (the last program's end against the
median program's).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

POINTS = ("entry", "waited", "listed", "streamed", "ended")


def summarize(stamps: torch.Tensor) -> dict:
    """Per-launch figures from a [programs, 12] int64 stamp table (globaltimer ns at even slots
    0-8, clock64 at odd slots 1-9, the SM at slot 10), in us from the earliest end of the wait."""
    ns = stamps[:, 0:10:2].double()
    cyc = stamps[:, 1:10:2].double()
    t0 = ns[:, 1].min()
    rel = (ns - t0) / 1e3  # us

    def q(v, p):
        return float(torch.quantile(v, p))

    chain = rel[:, 2] - rel[:, 1]
    stream = rel[:, 3] - rel[:, 2]
    per_sm = torch.bincount(stamps[:, 10].long())
    return dict(
        programs=int(stamps.shape[0]), sms=int((per_sm > 0).sum()), max_programs_per_sm=int(per_sm.max()),
        entry_us=[q(rel[:, 0], p) for p in (0, 0.5, 1)],
        waited_us=[q(rel[:, 1], p) for p in (0, 0.5, 0.9, 1)],
        chain_us=[q(chain, p) for p in (0.1, 0.5, 0.9)],
        chain_cycles_median=q(cyc[:, 2] - cyc[:, 1], 0.5),
        stream_us=[q(stream, p) for p in (0.1, 0.5, 0.9, 1)],
        streamed_us=[q(rel[:, 3], p) for p in (0, 0.5, 0.9, 1)],
        ended_us=[q(rel[:, 4], p) for p in (0.5, 1)],
        tail_us=q(rel[:, 4], 1) - q(rel[:, 4], 0.5),
    )


def main():
    from teal_nb.kernels import bench, gemv
    from teal_nb.kernels.tuning import config_for
    from teal_nb.results import write_json

    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["qkv_fused", "q|o", "k|v", "gate_up_fused", "down"])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.0, 0.5])
    ap.add_argument("--calls", type=int, default=24, help="launches in the graph; the middle one is stamped")
    ap.add_argument("--out", default="gemv_timeline.json")
    a = ap.parse_args()
    dtype = bench.DTYPES[a.dtype]
    res = dict(provenance=bench.provenance(" ".join(sys.argv)), points=POINTS, runs=[])
    for name in a.shapes:
        N, K, splits = bench.SHAPES[name]
        sb = bench.ShapeBench(N, K, splits, dtype)
        cfg = gemv.Config(*config_for(N, K, dtype, accum=True))
        grid_n = -(-N // min(cfg.block_n, N))
        programs = grid_n * -(-K // min(cfg.slice, K)) * max(1, cfg.share)
        x1 = sb.x.reshape(-1)
        outs = [torch.zeros(N, dtype=torch.float32, device="cuda") for _ in range(2)]
        for s in a.sparsities:
            thr = sb.thresholds(s)
            stamps = torch.zeros(programs, 12, dtype=torch.int64, device="cuda")
            wts = sb.wt

            def call(i, stamped):
                gemv._launch(x1, wts[i % len(wts)], thr, sb.splits, None, cfg, out=outs[i % 2],
                             clear=outs[(i + 1) % 2], stamps=stamps if stamped else None)

            for i in range(4):  # compile both variants, fill the scratch
                call(i, i == 3)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for i in range(a.calls):
                    call(i, i == a.calls // 2)
            runs = []
            for _ in range(5):
                g.replay()
                torch.cuda.synchronize()
                runs.append(summarize(stamps.cpu()) | dict(raw=stamps.cpu().tolist()))
            del g
            # The replay whose launch took the median time (first wait to last end).
            runs.sort(key=lambda r: r["ended_us"][1])
            r = runs[len(runs) // 2]
            us = bench.graph_us([lambda i=i: call(i, False) for i in range(len(wts) // 2 * 2)], n_calls=100, reps=5)
            res["runs"].append(dict(shape=name, dtype=a.dtype, sparsity=s, cfg=list(cfg), per_call_us=us,
                                    launch_us_replays=[x["ended_us"][1] for x in runs], **r))
            print(f"{name} s={s}: {us:.2f} us per call; {r['programs']} programs on {r['sms']} SMs", flush=True)
        del sb
        torch.cuda.empty_cache()
    write_json(a.out, res)

    def f(v):
        return "/".join(f"{x:.2f}" for x in v)

    print("\nus from the first program's wait; entry / waited / listed->streamed: quantiles")
    print(f"{'shape':14s} {'s':>4s} {'call':>6s} {'entry 0/.5/1':>18s} {'waited 0/.5/.9/1':>24s} "
          f"{'chain .1/.5/.9':>16s} {'stream .1/.5/.9/1':>24s} {'end .5/1':>12s} {'tail':>5s}")
    for r in res["runs"]:
        print(f"{r['shape']:14s} {r['sparsity']:4.2f} {r['per_call_us']:6.2f} {f(r['entry_us']):>18s} "
              f"{f(r['waited_us']):>24s} {f(r['chain_us']):>16s} {f(r['stream_us']):>24s} "
              f"{f(r['ended_us']):>12s} {r['tail_us']:5.2f}")


if __name__ == "__main__":
    main()
