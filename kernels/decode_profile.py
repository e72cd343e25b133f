"""Where a decode step's time goes, on one GPU: variants of the compiled step, timed and profiled.

    python kernels/decode_profile.py --out $OUT/decode_profile.json

For the Llama-3-8B shape (random weights), in one process:
1. the copy rate (the bandwidth ceiling) and two floors, each a CUDA graph of back-to-back
   projections over all 32 layers' own weights + lm_head with fixed inputs: cuBLAS (dense) and
   the sparse kernel at 50% (|x| <= median zeroed) - what the step would cost with no other work;
2. for each variant (dense / sparse backend x attention torch / fused, ...): the compiled step
   (reduce-overhead), decode tok/s (median of runs, gpt-fast protocol), and a profiler breakdown
   of one step's kernels by kind (cuBLAS, sparse GEMV, inductor's fused kernels, attention).
Sparse variants use thresholds from the dense run's own decode steps (one pass, no refinement):
realized sparsity is near, not at, the target (the recorded sweep calibrates properly).
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def set_attention_switches(da, opt, head_dim: int, s_max: int, max_partials: int) -> None:
    """Set teal_nb.decode_attention's launch-time switches for a variant's options, each from its
    default unless an option says otherwise: "attn=32x4" (the split kernel's BLOCK_S x warps;
    default 64 x 4), "nopdl" (no PDL), "kvall" (each program requests its whole block of cached
    rows, KV_UP_TO_POS off), "nopartials" (attention combines its splits itself instead of o's
    kernel), "stampkv" (decode_timeline: its q, k, v stamp waits for the cached rows too). Also
    used by decode_timeline.py."""
    attn_cfg = [tuple(map(int, o[5:].split("x"))) + (1,) for o in opt if o.startswith("attn=")]
    da.CONFIGS.pop((head_dim, s_max), None)
    if attn_cfg:
        da.CONFIGS[(head_dim, s_max)] = attn_cfg[0]
    da.PDL = "nopdl" not in opt
    da.KV_UP_TO_POS = "kvall" not in opt
    da.MAX_PARTIAL_SPLITS = 0 if "nopartials" in opt else max_partials
    da.STAMP_KV = "stampkv" in opt


def repeat_name(seen, name: str) -> str:
    """A variant run again in the same process (an A/B's baseline before and after) keeps both
    runs: the second under "name (2)", and so on."""
    n, out = 1, name
    while out in seen:
        n += 1
        out = f"{name} ({n})"
    return out


def kind_of(name: str) -> str:
    n = name.lower()
    if n.startswith("triton_"):  # inductor's kernels (their names list the fused ops, sparse_gemv too)
        if "argmax" in n:
            return "inductor_argmax"
        if "silu" in n:
            return "inductor_silu_mul"
        if "rsqrt" in n or "mean" in n:
            return "inductor_norm"
        if "softmax" in n or "amax" in n:
            return "inductor_softmax"
        return "inductor_other"
    if "sparse_gemv" in n:
        return "sparse_gemv"
    if "decode_attention" in n:
        return "attention_fused"
    if any(k in n for k in ("gemv", "gemm", "cutlass", "xmma", "cublas", "sm90", "splitk", "reduce_kernel")):
        return "cublas"
    if "copy" in n or "memcpy" in n or "memset" in n or "fill" in n:
        return "copy_fill"
    return "other"


def profile_kernels(fn, steps: int) -> dict:
    """Kernel time per step by kind (us) and kernel count per step, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    kinds, names, count = {}, {}, 0
    for e in prof.events():
        if str(getattr(e, "device_type", "")).endswith("CUDA") is False:
            continue
        dur = e.time_range.elapsed_us() if hasattr(e, "time_range") else getattr(e, "device_time", 0)
        if dur <= 0:
            continue
        k = kind_of(e.name)
        kinds[k] = kinds.get(k, 0.0) + dur
        names[e.name[:90]] = names.get(e.name[:90], 0.0) + dur
        count += 1
    per = {k: v / steps for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}
    top = sorted(names.items(), key=lambda kv: -kv[1])[:14]
    return {"us_per_step_by_kind": per, "kernels_per_step": count / steps,
            "kernel_us_per_step": sum(per.values()), "top_kernels_us_per_step": {k: v / steps for k, v in top}}


GEMV_SWITCHES = ("NORM_PRELOAD", "W_PREFETCH", "W_PREFETCH_ROWS", "W_PREFETCH_KINDS")


def set_gemv_switches(gemv, opt, defaults):
    """Set the sparse GEMV's launch-time switches (GEMV_SWITCHES) for a variant's options: each
    from `defaults` (the module's own values, read before any variant changed them) unless an
    option says otherwise: "nopreload" (NORM_PRELOAD off), "noprefetch" (W_PREFETCH off), "pfN"
    (W_PREFETCH_ROWS = N), "pf=norm+glu" (W_PREFETCH_KINDS = {"norm", "glu"}). Also used by
    decode_timeline.py."""
    for name in GEMV_SWITCHES:
        setattr(gemv, name, defaults[name])
    if "nopreload" in opt:
        gemv.NORM_PRELOAD = False
    if "noprefetch" in opt:
        gemv.W_PREFETCH = False
    for o in opt:
        if o.startswith("pf") and o[2:].isdigit():
            gemv.W_PREFETCH_ROWS = int(o[2:])
        elif o.startswith("pf="):
            gemv.W_PREFETCH_KINDS = set(o[3:].split("+"))


def set_accum_configs(tuning, opt, defaults):
    """Set sparse_gemv_into's launch configs (tuning.ACCUM) for a variant's options, from
    `defaults` (a copy of the table read before any variant changed it) unless an option
    "cfg=NxK=f1/f2/..." gives one shape another config (gemv.Config's fields, "/"-separated:
    commas and colons separate variants and options), e.g. fused gate/up with 2 programs per
    592-channel slice: "cfg=28672x4096=1024/8/4/0/0/592/2/1/0/0/0/1/2". The step's neighbours
    change a launch's best config (kernels/README.md item 29: gate/up's tail is 3.1 us in the step),
    so configs can be timed in the step itself. Also used by decode_timeline.py."""
    tuning.ACCUM.clear()
    tuning.ACCUM.update(defaults)
    for o in opt:
        if o.startswith("cfg="):
            shape, _, fields = o[4:].partition("=")
            n, _, k = shape.partition("x")
            try:
                key, cfg = (int(n), int(k)), tuple(int(f) for f in fields.split("/"))
            except ValueError:
                raise ValueError(f"option {o!r}: write cfg=NxK=f1/f2/... (gemv.Config's fields)") from None
            if key not in defaults:
                raise ValueError(f"option {o!r}: {shape} is not a shape of tuning.ACCUM ({sorted(defaults)})")
            tuning.ACCUM[key] = cfg


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--variants", default="dense:torch,dense:fused,triton50:torch,triton50:fused,triton0:fused",
                    help="comma list of backend:attention[:nopdl][:nopartials][:nopreload][:noprefetch][:pfN]"
                         "[:pf=kind+kind][:attn=BLOCK_SxWARPS][:kvall][:cfg=NxK=f1/f2/...] "
                         "(see set_attention_switches, set_gemv_switches, set_accum_configs)")
    ap.add_argument("--extra", default="", help="comma list: maxautotune (dense fused, mode=max-autotune)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--max-seq-len", type=int, default=256,
                    help="the KV cache's rows (the split attention kernel runs one program per 64 of them)")
    ap.add_argument("--budget-s", type=float, default=330)
    ap.add_argument("--out", default="decode_profile.json")
    a = ap.parse_args()
    t_start = time.perf_counter()
    left = lambda: a.budget_s - (time.perf_counter() - t_start)  # noqa: E731

    import torch._inductor.config as ic

    ic.triton.unique_kernel_names = True
    ic.fx_graph_cache = True
    torch._dynamo.config.cache_size_limit = 64
    from teal_nb import decode_attention
    from teal_nb.decode import Decoder, weight_bytes_per_token
    from teal_nb.decode_calibrate import calibrate_decode
    from teal_nb.kernels import gemv, sparse_gemv, tuning
    from teal_nb.kernels.bench import copy_rate_gbps, graph_us, provenance
    from teal_nb.results import write_json

    gemv_defaults = {name: getattr(gemv, name) for name in GEMV_SWITCHES}  # before any variant sets them
    accum_defaults = dict(tuning.ACCUM)
    res = {"provenance": provenance(" ".join(sys.argv)), "device": torch.cuda.get_device_name(),
           "torch": torch.__version__, "variants": {}, "floors": {}}

    def save():  # after every variant: what a run cut short measured, each file whole
        write_json(a.out, res)

    res["copy_GBps"] = copy_rate_gbps()
    dec = Decoder.random(a.preset, a.dtype, "cuda", max_seq_len=a.max_seq_len)
    cfg = dec.cfg
    wb = weight_bytes_per_token(cfg, a.dtype)
    res["weight_GB_per_token"] = wb["total"] / 1e9
    print(f"copy {res['copy_GBps']:.0f} GB/s; {wb['total'] / 1e9:.2f} GB/token -> "
          f"{res['copy_GBps'] * 1e9 / wb['total']:.0f} tok/s at the copy rate", flush=True)

    # Floors: the projections alone, back to back, each layer its own weights.
    dec.prepare_triton()
    xh = torch.randn(1, 1, cfg.hidden, device="cuda", dtype=dec.dtype)
    xi = torch.randn(1, 1, cfg.intermediate, device="cuda", dtype=dec.dtype)
    th = {n: torch.full((k,), float(x.float().abs().median()), device="cuda")
          for n, k, x in (("h1", 1, xh), ("h2", 2, xh), ("h3", 3, xh), ("i1", 1, xi))}

    def dense_gemvs():
        for blk in dec.layers:
            F.linear(xh, blk.qkv)
            F.linear(xh, blk.o)
            F.linear(xh, blk.gate_up)
            F.linear(xi, blk.down)
        F.linear(xh, dec.lm_head)

    def sparse_gemvs():
        for blk in dec.layers:
            sparse_gemv(xh, blk.qkv_t, th["h3"], splits=[cfg.q_size, cfg.kv_size, cfg.kv_size])
            sparse_gemv(xh, blk.o_t, th["h1"])
            sparse_gemv(xh, blk.gate_up_t, th["h2"], splits=[cfg.intermediate, cfg.intermediate])
            sparse_gemv(xi, blk.down_t, th["i1"])
        F.linear(xh, dec.lm_head)

    def lm_head():
        F.linear(xh, dec.lm_head)

    for name, fn in (("dense_gemvs", dense_gemvs), ("sparse50_gemvs", sparse_gemvs), ("lm_head", lm_head)):
        try:
            us = graph_us([fn], n_calls=1, reps=20)
        except Exception as e:
            res.setdefault("errors", []).append(f"floor {name}: {type(e).__name__}: {e}")
            print("ERROR floor", name, e, flush=True)
            continue
        res["floors"][name] = us
        print(f"floor {name}: {us:.0f} us/step" + (f" = {1e6 / us:.0f} tok/s" if name != "lm_head" else ""),
              flush=True)
    save()

    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab, (1, 5), generator=gen).cuda()
    dec.set_sparsity(None, backend="dense")
    dec.attention = "torch"
    forced, _ = dec.generate(prompt, a.new_tokens)  # eager: the sequence every variant decodes
    thr = {}

    max_partials = decode_attention.MAX_PARTIAL_SPLITS

    def run_variant(key, mode="reduce-overhead"):
        # The attention's options: set_attention_switches; the sparse GEMV's switches and
        # configs: set_gemv_switches, set_accum_configs.
        backend, attn, *opt = key.split(":")
        set_gemv_switches(gemv, opt, gemv_defaults)
        set_accum_configs(tuning, opt, accum_defaults)
        set_attention_switches(decode_attention, opt, cfg.head_dim, dec.max_seq_len, max_partials)
        t0 = time.perf_counter()
        dec.attention = attn
        torch._dynamo.reset()  # a fresh capture: the flag is read at capture, and dynamo would reuse the last
        if backend == "dense":
            dec.set_sparsity(None, backend="dense")
        else:
            s = int(backend[len("triton"):]) / 100
            if s > 0 and s not in thr:
                tc = time.perf_counter()
                thr[s] = calibrate_decode(dec, prompt, a.new_tokens, s, iters=0, forced=forced)
                print(f"  thresholds s={s}: {time.perf_counter() - tc:.0f} s", flush=True)
            dec.set_sparsity(thr[s] if s > 0 else None, backend="triton")
        dec.compile(mode)
        tok_s = []
        for i in range(2 + a.runs):
            ids, t = dec.generate(prompt, a.new_tokens, forced=None if backend == "dense" else forced)
            if i >= 2:
                tok_s.append(t["decode_tok_s"])
        t_compile_run = time.perf_counter() - t0
        pos = torch.tensor([100], device="cuda")
        tok = forced[:, 100:101].clone()

        def one():
            torch.compiler.cudagraph_mark_step_begin()
            dec._compiled(tok, pos)

        prof = profile_kernels(one, 5)
        if prof["kernels_per_step"] < 20:  # the profiler saw no kernels inside the CUDA graph
            plain = torch.compile(dec._step, fullgraph=True)
            plain(tok, pos)
            prof = profile_kernels(lambda: plain(tok, pos), 5)
            prof["profiled"] = "compiled without CUDA graphs"
        med = statistics.median(tok_s)
        rec = {"tok_s": med, "tok_s_runs": tok_s, "step_us": 1e6 / med, "wall_s": t_compile_run, **prof,
               "gap_us_per_step": 1e6 / med - prof["kernel_us_per_step"], "mode": mode}
        name = key + ("" if mode == "reduce-overhead" else f":{mode}")
        res["variants"][repeat_name(res["variants"], name)] = rec
        save()
        kinds = " ".join(f"{k}={v:.0f}" for k, v in prof["us_per_step_by_kind"].items())
        print(f"{key} [{mode}]: {med:.1f} tok/s, step {1e6 / med:.0f} us, kernels {prof['kernel_us_per_step']:.0f} us "
              f"({prof['kernels_per_step']:.0f}/step: {kinds}) [{t_compile_run:.0f} s]", flush=True)

    for key in a.variants.split(","):
        if left() < 45:
            print(f"skip {key}: {left():.0f} s left")
            continue
        try:
            run_variant(key)
        except Exception as e:
            import traceback

            traceback.print_exc(limit=5)
            res.setdefault("errors", []).append(f"{key}: {type(e).__name__}: {e}")
            save()
    for extra in [e for e in a.extra.split(",") if e]:
        if left() < 100:
            print(f"skip {extra}: {left():.0f} s left")
            continue
        try:
            if extra == "maxautotune":
                run_variant("dense:fused", mode="max-autotune")
        except Exception as e:
            import traceback

            traceback.print_exc(limit=5)
            res.setdefault("errors", []).append(f"{extra}: {type(e).__name__}: {e}")
    res["wall_s"] = time.perf_counter() - t_start
    save()
    print("\nvariant                         tok/s  step_us kern_us  gap_us  n/step  top kinds")
    for k, r in res["variants"].items():
        top = " ".join(f"{n}={v:.0f}" for n, v in list(r["us_per_step_by_kind"].items())[:5])
        print(f"{k:30} {r['tok_s']:6.1f} {r['step_us']:8.0f} {r['kernel_us_per_step']:7.0f} {r['gap_us_per_step']:7.0f} "
              f"{r['kernels_per_step']:7.0f}  {top}")
    print("floors (us/step): " + " ".join(f"{k}={v:.0f}" for k, v in res["floors"].items()))


if __name__ == "__main__":
    with torch.no_grad():
        main()
