"""End-to-end decode benchmark: tokens/s, dense and TEAL-sparse, on random weights of a preset's shape.

gpt-fast's protocol: batch 1, a few prompt tokens, 200 new tokens, greedy; the one-token step
compiled (reduce-overhead: one CUDA graph per step). For each dtype:

1. a device-to-device copy rate, measured in the same run (the bandwidth ceiling);
2. dense (cuBLAS) decode: median tokens/s over `runs` generations;
3. per target sparsity (and a non-uniform allocation): thresholds calibrated on the model's own
   decode steps for a calibration prompt (teal_nb.decode_calibrate), then realized sparsity per
   (layer, site) counted on the benchmark prompt's decode steps through the sparse backend, then
   the median tokens/s of the compiled sparse decoder.

Decode tokens/s counts the steps after the first new token (the prompt's forward, eager and
dense, is timed apart as prefill); `tok_s_e2e` includes the prefill, as gpt-fast prints it.
Each record also gives weight bytes read per token (skipped columns of the realized sparsity
not counted), the implied GB/s and its share of the copy rate, the speedup over dense in the
same run and the Amdahl ceiling of the sparsity (dense bytes / sparse bytes, lm_head dense).
"""
from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import torch

from .config import SITES, get_preset
from .kernels.bench import copy_rate_gbps


def _graphs_compiled() -> int:
    """Graphs dynamo compiled in this process so far: one per (dtype, backend) when nothing
    recompiles per position (the position is a tensor, the thresholds a buffer)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001 - bookkeeping only
        return -1


def _timed_runs(dec, prompt, new_tokens, runs, warmup, forced=None):
    ids = None
    for _ in range(warmup):
        ids, _ = dec.generate(prompt, new_tokens, forced=forced)
    timings = []
    for _ in range(runs):
        ids, t = dec.generate(prompt, new_tokens, forced=forced)
        timings.append(t)
    return ids, timings


def _record(dec, cfg_name, dtype, backend, allocation, target, timings, realized, copy_gbps, dense_tok_s,
            tokens_match=None, thresholds=None):
    from .decode import amdahl_ceiling, weight_bytes_per_token

    tok_s = statistics.median(t["decode_tok_s"] for t in timings)
    rz = None if realized is None else realized
    sparsity_for_bytes = None if rz is None else torch.nan_to_num(rz, nan=0.0)
    wb = weight_bytes_per_token(dec.cfg, dtype, sparsity_for_bytes)
    gbps = wb["total"] * tok_s / 1e9
    rec = {
        "model": cfg_name, "dtype": str(dtype).replace("torch.", ""), "backend": backend,
        "allocation": allocation, "sparsity": target,
        "tok_s": tok_s, "tok_s_runs": [t["decode_tok_s"] for t in timings],
        "tok_s_e2e": statistics.median(t["tok_s"] for t in timings),
        "prefill_ms": statistics.median(t["prefill_s"] for t in timings) * 1e3,
        "new_tokens": timings[0]["new_tokens"],
        "weight_GB_per_token": wb["total"] / 1e9,
        "weight_GBps": gbps, "copy_GBps": copy_gbps, "pct_copy_rate": 100 * gbps / copy_gbps,
        "ceiling_tok_s_at_copy_rate": copy_gbps * 1e9 / wb["total"],
    }
    if rz is not None:
        site_mean = torch.nanmean(rz, dim=0)
        rec["realized_sparsity"] = {s: float(site_mean[j]) for j, s in enumerate(SITES)}
        rec["realized_sparsity_param_weighted"] = 1 - (wb["blocks"] / (wb["dense_total"] - wb["lm_head"]))
        rec["realized_sparsity_layer_site"] = [[round(float(v), 4) for v in row] for row in rz]
        rec["amdahl_ceiling"] = amdahl_ceiling(dec.cfg, dtype, sparsity_for_bytes)
    if dense_tok_s:
        rec["speedup_vs_dense"] = tok_s / dense_tok_s
    if tokens_match is not None:
        rec["tokens_match_eager"] = tokens_match
    if thresholds is not None:
        rec["thresholds_mean_per_site"] = {s: float(thresholds[:, j].mean()) for j, s in enumerate(SITES)}
    return rec


def check_fused_attention(dec, log=print) -> bool:
    """One call of the fused attention kernel against its torch reference on the decoder's device
    and shapes; on a mismatch or an error the decoder falls back to torch attention."""
    import math as _m

    from .decode_attention import decode_attention, decode_attention_reference, usable

    if dec.attention == "torch" or not usable(dec.device) or dec.device.type != "cuda":
        return False
    cfg = dec.cfg
    g = torch.Generator(device=dec.device).manual_seed(0)
    try:
        qkv = torch.randn(1, 1, cfg.proj_shape("qkv")[0], device=dec.device, generator=g).to(dec.dtype)
        kc = torch.randn_like(dec.layers[0].k_cache.float(), generator=g).to(dec.dtype)
        vc = torch.randn_like(kc.float(), generator=g).to(dec.dtype)
        kr, vr = kc.clone(), vc.clone()
        errs = []
        for p in (0, 100, dec.max_seq_len - 1):
            pos = torch.tensor([p], device=dec.device)
            y = decode_attention(qkv, dec.cos, dec.sin, pos, kc, vc, cfg.n_heads, 1 / _m.sqrt(cfg.head_dim))
            ref = decode_attention_reference(qkv, dec.cos, dec.sin, pos, kr, vr, cfg.n_heads,
                                             1 / _m.sqrt(cfg.head_dim))
            errs.append(float((y.float() - ref.float()).norm() / ref.float().norm()))
        ok = max(errs) < 2e-2 and bool(torch.isfinite(y).all())
    except Exception as e:  # noqa: BLE001 - a kernel that fails here must not sink the run
        log(f"fused attention failed ({type(e).__name__}: {e}): torch attention")
        ok = False
        errs = []
    if not ok:
        dec.attention = "torch"
    log(f"fused attention check: rel. errors {', '.join(f'{e:.1e}' for e in errs)} -> "
        f"{'fused' if ok else 'torch'}")
    return ok


def choose_attention_config(dec, log=print) -> dict:
    """Time the fused attention kernel's launch configs (teal_nb.decode_attention.CANDIDATES) on
    all layers' caches (random contents) at a few positions, in a CUDA graph; keep the fastest
    for the rest of the run. Returns {"us_per_layer": {"BLOCK_SxWARPSxSPLIT": mean us per layer},
    "positions": [...], "chosen": key}."""
    import math as _m
    import statistics as _st

    from .decode_attention import CANDIDATES, CONFIGS, decode_attention, launch_config
    from .kernels.bench import graph_us

    cfg = dec.cfg
    d, s_max = cfg.head_dim, dec.max_seq_len
    if (d, s_max) in CONFIGS:  # timed earlier in this process (another dtype): keep that choice
        chosen = "x".join(map(str, launch_config(d, s_max)))
        log(f"attention: {chosen} (timed earlier in this run)")
        return {"chosen": chosen, "note": "timed earlier in this run (first dtype)"}
    g = torch.Generator(device=dec.device).manual_seed(1)
    with torch.no_grad():
        for b in dec.layers:  # not zeros: real values (generation overwrites every row it reads)
            b.k_cache.normal_(generator=g)
            b.v_cache.normal_(generator=g)
    qkv = torch.randn(1, 1, cfg.proj_shape("qkv")[0], device=dec.device, generator=g).to(dec.dtype)
    positions = [p for p in (50, 120, 200) if p < s_max] or [s_max - 1]
    out, seen = {}, set()
    for cand in CANDIDATES:
        CONFIGS[(d, s_max)] = cand
        eff = launch_config(d, s_max)
        if eff in seen:
            continue
        seen.add(eff)
        try:
            times = []
            for p in positions:
                pos = torch.tensor([p], device=dec.device)
                calls = [lambda b=b, pos=pos: decode_attention(qkv, dec.cos, dec.sin, pos, b.k_cache, b.v_cache,
                                                               cfg.n_heads, 1 / _m.sqrt(d)) for b in dec.layers]
                times.append(graph_us(calls, len(calls), 10))
            out["x".join(map(str, eff))] = _st.mean(times)  # BLOCK_S x warps x split
        except Exception as e:  # noqa: BLE001 - a config that fails to build is not chosen
            log(f"attention config {eff}: {type(e).__name__}: {e}")
    if not out:
        CONFIGS.pop((d, s_max), None)
        return {"chosen": None}
    best = min(out, key=out.get)
    CONFIGS[(d, s_max)] = tuple(int(v) for v in best.split("x"))
    log("attention (us per layer, mean over positions " + ", ".join(map(str, positions)) + "): "
        + ", ".join(f"{k} {v:.1f}" for k, v in out.items()) + f" -> {best}")
    return {"us_per_layer": out, "positions": positions, "chosen": best}


def check_sparse_kernels(dec, log=print, sparsity: float = 0.5) -> dict:
    """The sparse kernels on the decoder's own weights (first and last layer, four projections,
    each called twice: the split-K scratch must come back clean) against the pure-torch
    reference, at thresholds that zero `sparsity` of a random input. Max relative error."""
    from .decode import PROJ_SITES
    from .kernels import sparse_gemv, sparse_gemv_reference

    dec.prepare_triton()
    errs = {}
    g = torch.Generator(device=dec.device).manual_seed(2)
    for li in sorted({0, dec.cfg.n_layers - 1}):
        blk = dec.layers[li]
        for proj, cols in PROJ_SITES.items():
            n, k = dec.cfg.proj_shape(proj)
            x = torch.randn(1, 1, k, device=dec.device, generator=g).to(dec.dtype)
            t = torch.full((len(cols),), float(x.float().abs().quantile(sparsity)), device=dec.device)
            wt = getattr(blk, f"{proj}_t")
            splits = dec._splits(proj)
            ref = sparse_gemv_reference(x, wt, t, splits).float()
            worst = 0.0
            for _ in range(2):
                y = sparse_gemv(x, wt, t, splits).float()
                worst = max(worst, float((y - ref).norm() / ref.norm()))
            errs[f"{li}:{proj}"] = worst
    out = {"max_rel_err": max(errs.values()), "per_projection": errs}
    log(f"sparse kernels vs reference on the model's weights: max rel. error {out['max_rel_err']:.1e}")
    # The fused step (sparse_gemv_into, norms and residual adds inside the kernels) against the
    # unfused one, eagerly, one decode step at the thresholds now set (the bench calls this
    # before any is: every channel kept).
    if dec._fused_attention():
        tok = torch.randint(0, dec.cfg.vocab, (1, 1), generator=g, device=dec.device)
        pos = torch.tensor([1], device=dec.device)
        was, backend = dec.fused_step, dec.backend
        dec.backend = "triton"
        with torch.no_grad():
            dec.fused_step = False
            ref = dec.forward(tok, pos).float()
            dec.fused_step = True
            got = dec.forward(tok, pos).float()
        dec.fused_step, dec.backend = was, backend
        out["fused_step_vs_unfused_rel_err"] = float((got - ref).norm() / ref.norm())
        log(f"fused step vs unfused step (logits): rel. error {out['fused_step_vs_unfused_rel_err']:.1e}")
    return out


def _persistent_choices(max_numel: int = 8192):
    """Inductor heuristics that make every reduction of at most `max_numel` elements persistent
    (one pass, the row in registers). Inductor's default keeps single-row reductions over more
    than 1024 elements (the RMSNorms over 4096) as a loop that reads the row twice."""
    from torch._inductor.choices import InductorChoices
    from torch._inductor.virtualized import V

    class PersistentSmallReductions(InductorChoices):
        @staticmethod
        def should_use_persistent_reduction(*args, **kwargs):
            features = args[0] if args else kwargs.get("features")
            try:
                if V.graph.sizevars.statically_known_leq(features.reduction_numel, max_numel):
                    return True
            except Exception:  # noqa: BLE001 - fall back to inductor's own rule
                pass
            return InductorChoices.should_use_persistent_reduction(*args, **kwargs)

    return PersistentSmallReductions()


def choose_reductions(dec, log=print) -> dict:
    """Time the step's residual add + RMSNorm compiled by inductor with its default reduction
    heuristics and with persistent small reductions (CUDA graph, 64 calls); if the persistent
    one wins by more than 3%, keep those heuristics for every compile that follows in this
    process (the decode steps' norms and argmax)."""
    import torch._inductor.config as ic
    from torch._inductor.choices import InductorChoices
    from torch._inductor.virtualized import V

    from .decode import rms_norm
    from .kernels.bench import graph_us

    hidden, eps = dec.cfg.hidden, dec.cfg.norm_eps
    hs = [torch.randn(1, 1, hidden, device=dec.device, dtype=dec.dtype) for _ in range(8)]
    ds = [torch.randn(1, 1, hidden, device=dec.device, dtype=dec.dtype) for _ in range(8)]
    w = dec.layers[0].attn_norm
    out = {}
    for style in ("default", "persistent"):
        # A new code object per style: dynamo caches compiled frames per code object.
        fn = eval("lambda h, d, w: rms_norm(h + d, w, eps)", {"rms_norm": rms_norm, "eps": eps})  # noqa: S307
        handler = _persistent_choices() if style == "persistent" else InductorChoices()
        try:
            with V.set_choices_handler(handler), ic.patch(fx_graph_cache=False):
                f = torch.compile(fn, fullgraph=True)
                f(hs[0], ds[0], w)
            out[style] = graph_us([lambda i=i: f(hs[i], ds[i], w) for i in range(8)], 64, 10)
        except Exception as e:  # noqa: BLE001
            log(f"reductions {style}: {type(e).__name__}: {e}")
    chosen = "default"
    if "persistent" in out and "default" in out and out["persistent"] < 0.97 * out["default"]:
        V.set_choices_handler(_persistent_choices())  # stays set: every later compile uses it
        chosen = "persistent"
    log("add + RMSNorm (us per call): " + ", ".join(f"{k} {v:.2f}" for k, v in out.items()) + f" -> {chosen}")
    return {"us_per_call": out, "chosen": chosen}


def choose_dense_layout(dec, log=print) -> dict:
    """Per projection, time three dense products over all layers' weights in a CUDA graph: cuBLAS
    reading W [N, K] (F.linear), cuBLAS reading W^T [K, N] (x @ W^T, the Triton layout made by
    prepare_triton), and our kernel keeping every channel (a negative threshold; for down it
    also computes SiLU x up from the gate/up output, which saves the decoder a launch that this
    timing does not count). Keep the fastest. Returns {proj: {"w_us", "wt_us", "triton_us", "chosen"}}."""
    import torch.nn.functional as F

    from .decode import PROJ_SITES
    from .kernels import sparse_gemv
    from .kernels.bench import graph_us

    dec.prepare_triton()
    cfg = dec.cfg
    out = {}
    dec.dense_wt, dec.dense_triton = set(), set()
    for proj in PROJ_SITES:
        n, k = cfg.proj_shape(proj)
        x = torch.randn(1, 1, k, device=dec.device, dtype=dec.dtype)
        glu = proj == "down"
        xg = torch.randn(1, 1, 2 * k, device=dec.device, dtype=dec.dtype) if glu else x
        splits, keep = dec._splits(proj), dec.keep_thresholds(proj)
        w_calls = [lambda b=b: F.linear(x, getattr(b, proj)) for b in dec.layers]
        wt_calls = [lambda b=b: torch.matmul(x, getattr(b, f"{proj}_t")) for b in dec.layers]
        k_calls = [lambda b=b: sparse_gemv(xg, getattr(b, f"{proj}_t"), keep, splits, glu=glu) for b in dec.layers]
        n_calls = 2 * len(dec.layers)
        w_us, wt_us, k_us = (graph_us(c, n_calls, 10) for c in (w_calls, wt_calls, k_calls))
        # Away from F.linear only where the other wins by more than the timer's noise.
        chosen = min((("w", w_us), ("wt", wt_us / 0.97), ("triton", k_us / 0.97)), key=lambda c: c[1])[0]
        if chosen == "wt":
            dec.dense_wt.add(proj)
        elif chosen == "triton":
            dec.dense_triton.add(proj)
        out[proj] = {"N": n, "K": k, "w_us": w_us, "wt_us": wt_us, "triton_us": k_us, "chosen": chosen}
        log(f"dense {proj} [{n}x{k}]: W {w_us:.1f} us, W^T {wt_us:.1f} us, ours (all kept) {k_us:.1f} us -> {chosen}")
    return out


def run_bench(preset: str = "llama-3-8b", dtypes=("bfloat16", "float16"), sparsities=(0.5, 0.4, 0.25, 0.65),
              nonuniform_at=(0.5,), runs: int = 5, warmup: int = 2, new_tokens: int = 200, prompt_len: int = 5,
              backend: str = "triton", device: str = "cuda", compile_mode: str | None = "reduce-overhead",
              n_layers: int | None = None, calib_iters: int = 4, calib_tol: float = 0.01, calib_prompt: str = "same",
              budget_s: float = 540.0, preset_overrides: dict | None = None, dense_layout: bool = True,
              sparsities_by_dtype: dict | None = None,
              out: str | Path | None = None, command: str | None = None, log=print) -> dict:
    """Run the sweep; write `out` (JSON) after every record so a cut-short run keeps what it measured."""
    from .decode import Decoder
    from .decode_calibrate import calibrate_decode, measure_realized, nonuniform_allocation, param_weighted_mean
    from .results import provenance, write_json

    t_start = time.perf_counter()
    left = lambda: budget_s - (time.perf_counter() - t_start)  # noqa: E731
    if device.startswith("cuda"):
        import torch._inductor.config as ic

        # gpt-fast's settings, less coordinate-descent tuning (minutes of compile for the few
        # small fused kernels around the GEMVs): TEAL_COORDINATE_DESCENT=1 turns it on.
        import os as _os

        ic.coordinate_descent_tuning = _os.environ.get("TEAL_COORDINATE_DESCENT") == "1"
        ic.triton.unique_kernel_names = True
        ic.fx_graph_cache = True
    prov = provenance(command)
    import os

    if os.environ.get("TEAL_GIT_SHA"):  # the GPU machine gets a copy of the tree without .git
        prov["git_sha"] = os.environ["TEAL_GIT_SHA"]
    if device.startswith("cuda"):
        prov["gpu"] = torch.cuda.get_device_name(device)
    result = {"provenance": prov, "protocol": {
        "preset": preset, "n_layers": n_layers, "batch": 1, "prompt_tokens": prompt_len, "new_tokens": new_tokens,
        "runs": runs, "warmup": warmup, "compile": compile_mode, "prefill": "none (dense)", "lm_head": "dense",
        "tokens": ("dense runs: free greedy; sparse runs: teacher-forced on the dense greedy continuation "
                   "(each step still computes its argmax), so every setting decodes the same 200 tokens and "
                   "realized sparsity is counted on exactly the timed sequence"),
        "thresholds": (f"exact |x| quantiles per (layer, site) over the decode steps of "
                       f"{'the benchmark sequence itself (as the authors did)' if calib_prompt == 'same' else 'a separate random prompt'}"
                       f", re-taken on the sparse run (up to {calib_iters} eager passes of the benchmarked backend, "
                       f"best kept, stop within {calib_tol})"),
        "realized_sparsity": ("fraction of |x| <= t per (layer, site) over the decode steps of the eager pass of the "
                              "benchmarked backend and thresholds on the timed (forced) sequence"
                              + (" (the calibration pass that produced the thresholds)" if calib_prompt == "same"
                                 else "")),
        "argmax": "greedy token on device, two-stage (chunk maxima, then the first chunk holding the largest)",
        "tok_s": "median over runs of decode tokens/s (steps after the first new token)"},
        "records": [], "skipped": []}

    def save():
        if out:
            write_json(out, result)

    cuda = device.startswith("cuda")
    copy_gbps = copy_rate_gbps() if cuda else float("nan")  # the kernels lab's timer, same protocol
    result["copy_GBps"] = copy_gbps
    log(f"copy rate {copy_gbps:.0f} GB/s (read + write)")
    for dtype in dtypes:
        if left() < 80:
            result["skipped"].append(f"{dtype}: time budget")
            log(f"skip {dtype}: {left():.0f} s left")
            continue
        t0 = time.perf_counter()
        shape = get_preset(preset).with_(**preset_overrides) if preset_overrides else preset
        dec = Decoder.random(shape, dtype, device, max_seq_len=max(64, 64 * math.ceil((prompt_len + new_tokens) / 64)),
                             n_layers=n_layers)
        name = f"random:{preset}" + (f"[{n_layers} layers]" if n_layers else "")
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, dec.cfg.vocab, (1, prompt_len), generator=gen).to(device)
        other = torch.randint(0, dec.cfg.vocab, (1, prompt_len), generator=gen).to(device)
        cal_ids = prompt if calib_prompt == "same" else other
        if cuda:
            torch.cuda.synchronize()
        log(f"[{dtype}] model built in {time.perf_counter() - t0:.1f} s")
        if cuda:
            if dec.attention != "torch":
                result.setdefault("attention_config", {})[dtype] = choose_attention_config(dec, log)
            fused = check_fused_attention(dec, log)
            if compile_mode and "reductions" not in result:  # once per process: it sets inductor's heuristics
                result["reductions"] = choose_reductions(dec, log)
            result["protocol"].setdefault("attention", {})[dtype] = (
                "fused Triton kernel (teal_nb.decode_attention: RoPE, cache write, attention)" if fused
                else "torch (matmuls + softmax)")
            if dense_layout:
                result.setdefault("dense_layout", {})[dtype] = choose_dense_layout(dec, log)

        # Dense.
        dec.set_sparsity(None, backend="dense")
        dec.compile(compile_mode if cuda else None)
        t0 = time.perf_counter()
        try:
            try:
                dense_ids, timings = _timed_runs(dec, prompt, new_tokens, runs, warmup)
            except Exception as e:
                if result.get("reductions", {}).get("chosen") != "persistent":
                    raise
                # The run's own choice of inductor heuristics broke the compile: back to the default.
                from torch._inductor.choices import InductorChoices
                from torch._inductor.virtualized import V

                log(f"ERROR dense compiled with persistent reductions ({type(e).__name__}: {e}): default heuristics")
                result.setdefault("errors", []).append(f"{dtype} dense, persistent reductions: {type(e).__name__}: {e}")
                V.set_choices_handler(InductorChoices())
                result["reductions"]["chosen"] = "default (persistent failed to compile)"
                dec.compile(compile_mode)
                dense_ids, timings = _timed_runs(dec, prompt, new_tokens, runs, warmup)
        except Exception as e:  # compile failed: measure eagerly rather than nothing
            import traceback

            log("ERROR dense compiled: " + traceback.format_exc(limit=6))
            result.setdefault("errors", []).append(f"{dtype} dense compiled: {type(e).__name__}: {e}")
            dec._compiled = None
            compile_mode = None
            dense_ids, timings = _timed_runs(dec, prompt, new_tokens, runs, 1)
        forced = dense_ids
        dec_c, dec._compiled = dec._compiled, None
        if calib_prompt == "same":
            cal_forced = forced
        else:
            cal_forced, _ = dec.generate(cal_ids, new_tokens)
        # The dense run's site inputs on the calibration sequence: every target starts from them.
        t0 = time.perf_counter()
        from .decode_calibrate import record_decode_inputs

        dense_records = record_decode_inputs(dec, cal_ids, new_tokens, cal_forced)
        dec._compiled = dec_c
        log(f"[{dtype}] dense site inputs recorded in {time.perf_counter() - t0:.1f} s")
        rec = _record(dec, name, dec.dtype, "dense", "dense", 0.0, timings, None, copy_gbps, None)
        rec["compiled"] = dec._compiled is not None
        rec["graphs_compiled_so_far"] = _graphs_compiled()
        dense_tok_s = rec["tok_s"]
        rec["wall_s"] = time.perf_counter() - t0
        result["records"].append(rec)
        save()
        log(f"[{dtype}] dense: {dense_tok_s:.1f} tok/s ({rec['weight_GBps']:.0f} GB/s, "
            f"{rec['pct_copy_rate']:.0f}% of copy) [{rec['wall_s']:.0f} s incl. compile]")

        configs = []
        for s in (sparsities_by_dtype or {}).get(dtype, sparsities):
            configs.append(("uniform", s, torch.full((dec.cfg.n_layers, len(SITES)), float(s))))
            if s in nonuniform_at and dtype not in (sparsities_by_dtype or {}):
                configs.append(("nonuniform", s, nonuniform_allocation(dec.cfg, s)))
        configs.append(("uniform", 0.0, None))  # the sparse path with nothing skipped
        first_sparse, sparse_ok = True, False
        if backend == "triton":
            result.setdefault("kernel_check", {})[dtype] = check_sparse_kernels(dec, log)
            save()
        for allocation, s, alloc in configs:
            need = 60 if first_sparse else 25
            if left() < need:
                result["skipped"].append(f"{dtype} {backend} {allocation} {s}: time budget")
                log(f"skip {dtype} {allocation} {s}: {left():.0f} s left")
                continue
            try:
                t0 = time.perf_counter()
                cal_info = {}
                if alloc is None:
                    th = torch.full((dec.cfg.n_layers, len(SITES)), -1.0)
                else:
                    th = calibrate_decode(dec, cal_ids, new_tokens, alloc, iters=calib_iters, tol=calib_tol,
                                          forced=cal_forced, info=cal_info, backend=backend,
                                          dense_records=dense_records)
                t_cal = time.perf_counter() - t0
                dec.set_sparsity(th, backend=backend)
                if calib_prompt == "same" and "realized" in cal_info:
                    # The calibration pass that produced these thresholds ran this backend, eagerly,
                    # on the benchmark's own forced sequence: its count is the realized sparsity.
                    realized, eager_ids = cal_info["realized"], cal_info["ids"]
                else:
                    realized, eager_ids = measure_realized(dec, prompt, new_tokens, forced=forced)
                if first_sparse:
                    dec.compile(compile_mode if cuda else None)
                    first_sparse = False
                t1 = time.perf_counter()
                ids, timings = _timed_runs(dec, prompt, new_tokens, runs, warmup, forced)
                match = float((ids[0, prompt_len:] == eager_ids[0, prompt_len:]).float().mean())
                rec = _record(dec, name, dec.dtype, backend, allocation, s, timings, realized, copy_gbps, dense_tok_s,
                              match, th)
                if alloc is not None:
                    rec["target_param_weighted"] = param_weighted_mean(dec.cfg, alloc)
                    rec["target_sparsity_per_site"] = {j: float(alloc[:, i].mean()) for i, j in enumerate(SITES)}
                    dev = (realized - alloc).abs()
                    rec["max_abs_dev_site_mean"] = float((realized.nanmean(0) - alloc.mean(0)).abs().max())
                    rec["max_abs_dev_layer_site"] = float(dev.nan_to_num(0).max())
                rec["calibration_s"] = t_cal
                rec["calibration_max_dev_per_pass"] = cal_info.get("max_dev_per_pass")
                rec["wall_s"] = time.perf_counter() - t1
                rec["compiled"] = dec._compiled is not None
                rec["graphs_compiled_so_far"] = _graphs_compiled()
                result["records"].append(rec)
                save()
                sparse_ok = True
                rz = rec["realized_sparsity"]
                log(f"[{dtype}] {backend} {allocation} s={s}: {rec['tok_s']:.1f} tok/s = "
                    f"{rec['speedup_vs_dense']:.2f}x dense (ceiling {rec.get('amdahl_ceiling', 1):.2f}x), "
                    f"realized " + " ".join(f"{k}={v:.3f}" for k, v in rz.items())
                    + f", tokens match eager {match:.2f} [{rec['wall_s']:.0f} s, calib {t_cal:.0f} s]")
            except Exception as e:  # keep what was measured; say what broke
                import traceback

                msg = f"{dtype} {backend} {allocation} {s}: {type(e).__name__}: {e}"
                result.setdefault("errors", []).append(msg)
                save()
                log("ERROR " + msg + "\n" + traceback.format_exc(limit=6))
                if not sparse_ok:  # the compiled sparse step never ran: go on eagerly, and say so
                    dec._compiled = None
                    result["protocol"]["note"] = f"{dtype}: sparse runs eager after: {msg}"
        del dec
        if cuda:
            torch.cuda.empty_cache()
    result["summary"] = summarize(result["records"])
    result["wall_s"] = time.perf_counter() - t_start
    save()
    return result


def summarize(records: list[dict]) -> dict:
    """The must-show ratios per dtype."""
    out = {}
    for r in records:
        d = out.setdefault(r["dtype"], {})
        if r["backend"] == "dense":
            d["dense_tok_s"] = r["tok_s"]
            d["dense_pct_copy_rate"] = r["pct_copy_rate"]
            continue
        if r["sparsity"] == 0 and r["allocation"] == "uniform":
            d["sparse_path_at_s0_tok_s"] = r["tok_s"]
        key = f"{r['allocation']}_{r['sparsity']}"
        entry = {"tok_s": r["tok_s"], "speedup": r.get("speedup_vs_dense"), "ceiling": r.get("amdahl_ceiling")}
        if r["sparsity"] > 0 and "realized_sparsity" in r:
            if r["allocation"] == "uniform":
                entry["max_site_dev"] = max(abs(v - r["sparsity"]) for v in r["realized_sparsity"].values())
            else:
                entry["max_site_dev"] = r.get("max_abs_dev_site_mean")
            entry["max_layer_site_dev"] = r.get("max_abs_dev_layer_site", max(
                abs(v - r["sparsity"]) for row in r["realized_sparsity_layer_site"] for v in row))
        d[key] = entry
    return out


def format_table(records: list[dict]) -> str:
    lines = [f"{'dtype':9} {'backend':7} {'alloc':10} {'s':>5} {'tok/s':>7} {'x dense':>7} {'ceiling':>7} "
             f"{'GB/s':>6} {'%copy':>5}  realized (q k v o gate up down)"]
    for r in records:
        rz = r.get("realized_sparsity")
        rzs = " ".join(f"{v:.2f}" for v in rz.values()) if rz else "-"
        lines.append(f"{r['dtype']:9} {r['backend']:7} {r['allocation']:10} {r['sparsity']:5.2f} {r['tok_s']:7.1f} "
                     f"{r.get('speedup_vs_dense', 1.0):7.2f} {r.get('amdahl_ceiling', 1.0):7.2f} "
                     f"{r['weight_GBps']:6.0f} {r['pct_copy_rate']:5.0f}  {rzs}")
    return "\n".join(lines)


__all__ = ["run_bench", "copy_rate_gbps", "summarize", "format_table"]
