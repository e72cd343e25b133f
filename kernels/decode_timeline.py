"""Every sparse GEMV launch of one compiled decode step, seen from inside, on one GPU.

    PYTHONPATH=. python kernels/decode_timeline.py --out $OUT/decode_timeline.json

`gemv_timeline.py` stamps one launch in a graph of launches of one shape; this stamps all 128
GEMV launches of a Llama-3-8B decode step (random weights, the fused step, as `decode_profile.py`
runs it) in one CUDA graph, so that the launches are seen next to their real neighbours: the
attention kernel between qkv and o, the norm-fused qkv after down. Each program writes the
GPU's global timer at entry, after its PDL wait, with its kept list stored, with its last W row
summed and after its epilogue (gemv._stamp, handed a table per launch through gemv.STAMP_HOOK).
The split attention kernel between qkv and o is stamped too (decode_attention.STAMP_HOOK; its
slots: entry, after the wait, q/k/v loaded, partial computed, end), unless --no-attention.

Per launch (`summarize_launch`): the programs' median entry, the first and last end of their
wait, the median time the list was stored and the last W row summed, the median and last end.
Per projection, averaged over the layers (`by_projection`): how early its programs enter
before the launch before ends, the gap from that end to its first program's wait ending, the
chain to the kept list, the streaming, the tail (for the attention kernel: the chain to the new
row's q, k, v loaded, the "streaming" to its partial computed). Variants (`--variants`) set
gemv's and the attention's switches as decode_profile.py's options do, e.g.
`triton50:pf=plain+glu+partials+norm` (the prefetch in the NORM launches too, which lost 2% of
the step: kernels/README.md item 26), `triton50:attn=32x4`, or `triton50:stampkv` (the
attention's "q, k, v loaded" stamp waits for its cached rows too: when its inputs are all in).
First run: kernels/README.md item 29 (the GEMV launches only).
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

PROJECTIONS = ("qkv", "o", "gate_up", "down")  # the order of a layer's GEMV launches
WITH_ATTENTION = ("qkv", "attention", "o", "gate_up", "down")  # and with the attention kernel stamped


class StampTables:
    """gemv.STAMP_HOOK: hands each compacting launch the next rows of one preallocated int64
    table (nothing is allocated while a CUDA graph is captured) and remembers what it was for."""

    def __init__(self, capacity: int, device):
        self.table = torch.zeros(capacity, 12, dtype=torch.int64, device=device)
        self.launches = []  # (first row, programs, info)

    def __call__(self, programs: int, info: dict):
        start = sum(p for _, p, _ in self.launches)
        if start + programs > self.table.shape[0]:
            raise RuntimeError(f"stamp tables: launch {len(self.launches)} needs rows {start}-{start + programs}, "
                               f"the table has {self.table.shape[0]}: pass a larger --capacity")
        self.launches.append((start, programs, info))
        return self.table[start:start + programs]

    def reset(self):
        self.launches = []


def summarize_launch(stamps: torch.Tensor, t0: int) -> dict:
    """One launch's [programs, 12] table (globaltimer ns at slots 0, 2, 4, 6, 8: entry, waited,
    listed, streamed, ended) in us from t0 (ns); entry_first, the first program's entry, tells a
    launch that PDL started early (some programs in) from one held back until the launch before
    frees its SMs (all in late). A slot a program did not reach is 0 and left out (the attention
    kernel's splits past the position have no q, k, v to load); the median end is over the
    programs that streamed."""
    slots = stamps[:, 0:10:2]
    cols = [(slots[:, i][slots[:, i] != 0].double() - t0) / 1e3 for i in range(5)]
    # The median end of the programs that did the work (reached slot 3): a split past the position
    # ends at once and would pull it early.
    worked = (slots[:, 3] != 0) & (slots[:, 4] != 0)
    ends = (slots[worked, 4].double() - t0) / 1e3 if bool(worked.any()) else cols[4]
    med = [float(c.quantile(0.5)) for c in cols[:4] + [ends]]  # (interpolated, as gemv_timeline.summarize)
    # The timer ticks in 0.256-1 us steps; each program's cycle counter (slots 1, 3, .., 9, one SM)
    # resolves its own phases: median cycles from each slot to the next, over the programs that
    # reached both.
    clocks = stamps[:, 1:10:2]
    cycles = []
    for i in range(4):
        both = (slots[:, i] != 0) & (slots[:, i + 1] != 0)
        diff = (clocks[both, i + 1] - clocks[both, i]).double()
        cycles.append(float(diff.quantile(0.5)) if diff.numel() else None)
    return dict(entry_first=float(cols[0].min()), entry_med=med[0], waited_first=float(cols[1].min()),
                waited_last=float(cols[1].max()), listed_med=med[2], streamed_med=med[3], ended_med=med[4],
                ended_last=float(cols[4].max()), cycles_med=cycles)


def by_projection(launches: list[dict], names: tuple = PROJECTIONS) -> dict:
    """Per launch of a layer (launches in `names` order, layer after layer), medians over the
    layers: entry_early (the launch before's last end minus this one's median entry; first_early,
    minus its first program's entry), gap (this
    one's first wait end minus the launch before's last end; without the attention stamped, the
    attention kernel runs in o's gap), chain (first wait end to median list stored), stream (list stored to last row
    summed, medians), tail (last end minus median end), span (first wait end to last end); and
    cycles, the four phases from entry to end (summarize_launch's cycles_med) in SM cycles."""
    if len(launches) % len(names):
        raise ValueError(f"{len(launches)} launches is not a whole number of layers of {len(names)}")
    rows = {p: [] for p in names}
    for i, cur in enumerate(launches):
        prev_end = launches[i - 1]["ended_last"] if i else None
        rows[names[i % len(names)]].append(dict(
            entry_early=None if prev_end is None else prev_end - cur["entry_med"],
            first_early=None if prev_end is None else prev_end - cur["entry_first"],
            gap=None if prev_end is None else cur["waited_first"] - prev_end,
            chain=cur["listed_med"] - cur["waited_first"],
            stream=cur["streamed_med"] - cur["listed_med"],
            tail=cur["ended_last"] - cur["ended_med"],
            span=cur["ended_last"] - cur["waited_first"]))
    out = {}
    for p, rs in rows.items():
        out[p] = {k: statistics.median([r[k] for r in rs if r[k] is not None]) for k in rs[-1]}
        phases = [launch["cycles_med"] for launch in launches[names.index(p)::len(names)]]
        out[p]["cycles"] = [statistics.median(c) if (c := [ph[i] for ph in phases if ph[i] is not None]) else None
                            for i in range(4)]
    out["layer"] = (launches[-1]["ended_last"] - launches[0]["waited_first"]) / (len(launches) // len(names))
    return out


def main():
    import torch._inductor.config as ic

    from decode_profile import (GEMV_SWITCHES, repeat_name, set_accum_configs,  # the same variant options
                                set_attention_switches, set_gemv_switches)

    from teal_nb import decode_attention
    from teal_nb.decode import Decoder
    from teal_nb.decode_calibrate import calibrate_decode
    from teal_nb.kernels import gemv, tuning
    from teal_nb.kernels.bench import provenance
    from teal_nb.results import write_json

    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--variants", default="triton50,triton0",
                    help="comma list of tritonNN[:option...], the sparse GEMV's options of decode_profile.py")
    ap.add_argument("--new-tokens", type=int, default=200, help="the calibration's decode steps")
    ap.add_argument("--replays", type=int, default=5)
    ap.add_argument("--capacity", type=int, default=1 << 16, help="stamp table rows (programs per step)")
    ap.add_argument("--no-attention", dest="attention", action="store_false",
                    help="stamp the GEMV launches only, not the split attention kernel between qkv and o")
    ap.add_argument("--out", default="decode_timeline.json")
    a = ap.parse_args()
    names = WITH_ATTENTION if a.attention else PROJECTIONS
    ic.fx_graph_cache = True
    torch._dynamo.config.cache_size_limit = 64

    res = {"provenance": provenance(" ".join(sys.argv)), "projections": names, "variants": {}}
    dec = Decoder.random(a.preset, a.dtype, "cuda", max_seq_len=256)
    dec.prepare_triton()
    prompt = torch.randint(0, dec.cfg.vocab, (1, 5), generator=torch.Generator().manual_seed(0)).cuda()
    dec.set_sparsity(None, backend="dense")
    dec.attention = "torch"
    forced, _ = dec.generate(prompt, a.new_tokens)  # eager: the sequence every variant decodes
    pos = torch.tensor([100], device="cuda")
    tok = forced[:, 100:101].clone()
    tables = StampTables(a.capacity, "cuda")
    thr = {}
    gemv_defaults = {name: getattr(gemv, name) for name in GEMV_SWITCHES}  # before any variant sets them
    accum_defaults = dict(tuning.ACCUM)
    max_partials = decode_attention.MAX_PARTIAL_SPLITS

    def run(key):
        """One variant: set gemv's switches, compile the step, capture it with every launch
        stamped, replay it, keep the replay with the median layer time."""
        t_start = time.perf_counter()
        backend, *opt = key.split(":")
        if not (backend.startswith("triton") and backend[len("triton"):].isdigit()):
            raise ValueError(f"variant {key!r}: begin it with tritonNN, NN the sparsity in percent (triton0: "
                             "every channel kept, the dense step through the kernels)")
        s = int(backend[len("triton"):]) / 100
        set_gemv_switches(gemv, opt, gemv_defaults)
        set_accum_configs(tuning, opt, accum_defaults)
        set_attention_switches(decode_attention, opt, dec.cfg.head_dim, dec.max_seq_len, max_partials)
        if s > 0 and s not in thr:
            thr[s] = calibrate_decode(dec, prompt, a.new_tokens, s, iters=0, forced=forced)
        dec.attention = "fused"
        dec.set_sparsity(thr[s] if s > 0 else None, backend="triton")
        torch._dynamo.reset()
        step = torch.compile(dec._step, fullgraph=True)  # inductor's kernels, no CUDA graphs of its own
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(side):
                for i in range(3):  # compile (the last time the stamping kernels too), fill the scratch
                    gemv.STAMP_HOOK = tables if i == 2 else None
                    decode_attention.STAMP_HOOK = tables if i == 2 and a.attention else None
                    tables.reset()
                    step(tok, pos)
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            tables.reset()
            with torch.cuda.graph(g):
                step(tok, pos)
        finally:
            gemv.STAMP_HOOK = decode_attention.STAMP_HOOK = None
        replays = []
        for _ in range(a.replays):
            tables.table.zero_()
            g.replay()
            torch.cuda.synchronize()
            st = tables.table.cpu()
            launches = [st[i:i + n] for i, n, _ in tables.launches]
            t0 = int(launches[0][:, 2].min())
            summary = [summarize_launch(x, t0) for x in launches]
            replays.append(dict(launches=summary, by_projection=by_projection(summary, names)))
        del g
        replays.sort(key=lambda r: r["by_projection"]["layer"])
        rec = replays[len(replays) // 2]  # the replay with the median layer time
        rec.update(sparsity=s, kinds=[info["kind"] for _, _, info in tables.launches],
                   programs=[n for _, n, _ in tables.launches],
                   layer_us_replays=[r["by_projection"]["layer"] for r in replays],
                   wall_s=time.perf_counter() - t_start)
        res["variants"][repeat_name(res["variants"], key)] = rec
        write_json(a.out, res)
        print(f"{key}: {len(tables.launches)} launches, {rec['by_projection']['layer']:.2f} us per layer "
              f"[{rec['wall_s']:.0f} s]", flush=True)

    for key in a.variants.split(","):
        try:
            run(key)
        except Exception as e:  # one variant's failure loses neither the others nor what is written
            import traceback

            traceback.print_exc(limit=5)
            res.setdefault("errors", []).append(f"{key}: {type(e).__name__}: {e}")
            write_json(a.out, res)

    print("\nper launch of a layer, median over layers, us: entry_early / first_early / gap / chain / stream / "
          "tail / span")
    if a.attention:
        print("(attention: chain = wait end to q, k, v loaded; stream = to the partial computed)")
    for key, rec in res["variants"].items():
        bp = rec["by_projection"]
        print(f"{key}: {bp['layer']:.2f} us per layer")
        for p in names:
            print(f"  {p:9s} " + " ".join(f"{k} {v:6.2f}" for k, v in bp[p].items() if k != "cycles")
                  + "  cycles " + "/".join("-" if c is None else f"{c:.0f}" for c in bp[p]["cycles"]))


if __name__ == "__main__":
    with torch.no_grad():
        main()
