"""Benchmark of the sparse GEMV against cuBLAS on one GPU (the numbers in kernels/results/).

Timer (the anchors' protocol): a CUDA graph of back-to-back calls rotating over enough weight
copies that together they exceed the L2 cache several times, replayed several times; the figure
is the median microseconds per call. Dense `torch.nn.functional.linear` (cuBLAS) and a
device-to-device copy are measured in the same run. x is random Gaussian; the threshold for a
target sparsity s is the s-quantile of |x| (0 at s = 0); the realized sparsity is recorded, and
the relative error against an fp32 reference on the same (rounded) inputs.
"""
from __future__ import annotations

import math
import statistics

import torch

L2_BYTES = 60 * 2**20

# name -> (N, K, splits). Llama-3-8B decode shapes and the embedded SmolLM2-135M's.
LLAMA_SHAPES = {
    "qkv_fused": (6144, 4096, (4096, 1024, 1024)),
    "q|o": (4096, 4096, None),
    "k|v": (1024, 4096, None),
    "gate_up_fused": (28672, 4096, (14336, 14336)),
    "gate|up": (14336, 4096, None),
    "down": (4096, 14336, None),
}
SMOL_SHAPES = {
    "smol_qkv_fused": (960, 576, (576, 192, 192)),
    "smol_q|o": (576, 576, None),
    "smol_k|v": (192, 576, None),
    "smol_gate_up_fused": (3072, 576, (1536, 1536)),
    "smol_gate|up": (1536, 576, None),
    "smol_down": (576, 1536, None),
}
SHAPES = {**LLAMA_SHAPES, **SMOL_SHAPES}
SPARSITIES = (0.0, 0.25, 0.4, 0.5, 0.65, 0.8, 0.9)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def copy_rate_gbps(nbytes: int = 2 << 30, reps: int = 20) -> float:
    """Device-to-device copy rate, counting bytes read plus bytes written (GB/s)."""
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e-3)
    del a, b
    return 2 * nbytes / statistics.median(times) / 1e9


def graph_us(calls, n_calls: int = 200, reps: int = 10) -> float:
    """Median microseconds per call of a CUDA graph replaying `calls` round-robin n_calls times."""
    n_calls = max(n_calls, len(calls))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls[:3]:
            c()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(n_calls):
            calls[i % len(calls)]()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3 / n_calls)
    del g
    return statistics.median(times)


def n_copies(N: int, K: int, dtype: torch.dtype) -> int:
    nbytes = N * K * torch.tensor([], dtype=dtype).element_size()
    return min(512, max(2, math.ceil(3 * L2_BYTES / nbytes)))


def threshold_for(x: torch.Tensor, s: float) -> float:
    return float(torch.quantile(x.float().abs().flatten(), s)) if s > 0 else 0.0


class ShapeBench:
    """Weights (rotating copies, both layouts) and a token for one (shape, dtype)."""

    def __init__(self, N, K, splits, dtype, seed=0):
        from .gemv import prepare_weight

        g = torch.Generator(device="cuda").manual_seed(seed)
        self.N, self.K, self.dtype = N, K, dtype
        self.splits = tuple(splits) if splits else (N,)
        c = n_copies(N, K, dtype)
        self.w = [torch.randn(N, K, device="cuda", dtype=dtype, generator=g) for _ in range(c)]
        self.wt = [prepare_weight(w) for w in self.w]
        self.x = torch.randn(1, K, device="cuda", dtype=dtype, generator=g)

    def dense_us(self, **kw):
        x = self.x
        F = torch.nn.functional.linear
        return graph_us([lambda w=w: F(x, w) for w in self.w], **kw)

    def sparse_us(self, thr, cfg=None, **kw):
        from .gemv import _launch, sparse_gemv

        x, splits = self.x, self.splits
        if cfg is None:
            calls = [lambda wt=wt: sparse_gemv(x, wt, thr, splits) for wt in self.wt]
        else:
            x1 = x.reshape(-1)
            calls = [lambda wt=wt: _launch(x1, wt, thr, splits, None, cfg) for wt in self.wt]
        return graph_us(calls, **kw)

    def accum_us(self, thr, cfg=None, **kw):
        """sparse_gemv_into, as a decoder with an fp32 residual stream calls it: each call adds into
        one fp32 vector and zeroes the next call's (so the clearing is paid for, as in the decoder).
        cfg: a launch config instead of the package's."""
        from .gemv import _launch, sparse_gemv_into

        x, splits = self.x, self.splits
        outs = [torch.zeros(self.N, dtype=torch.float32, device="cuda") for _ in range(2)]
        wts = self.wt[:len(self.wt) // 2 * 2]
        if cfg is None:
            calls = [lambda i=i, wt=wt: sparse_gemv_into(outs[i % 2], x, wt, thr, splits, clear=outs[(i + 1) % 2])
                     for i, wt in enumerate(wts)]
        else:
            x1 = x.reshape(-1)
            calls = [lambda i=i, wt=wt: _launch(x1, wt, thr, splits, None, cfg, out=outs[i % 2],
                                                clear=outs[(i + 1) % 2]) for i, wt in enumerate(wts)]
        return graph_us(calls, **kw)

    def accum_error(self, thr, cfg=None):
        """rel_err of sparse_gemv_into (fp32 output, from zero) against the fp32 reference."""
        from .gemv import _launch, sparse_gemv_into, sparse_gemv_reference

        x, wt = self.x, self.wt[0]
        ref = sparse_gemv_reference(x.float(), wt, thr, self.splits).double()
        out = torch.zeros(1, self.N, dtype=torch.float32, device="cuda")
        if cfg is None:
            sparse_gemv_into(out, x, wt, thr, self.splits)
        else:
            _launch(x.reshape(-1), wt, thr, self.splits, None, cfg, out=out.view(-1))
        return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))

    def thresholds(self, s):
        t = threshold_for(self.x, s)
        return torch.full((len(self.splits),), t, dtype=torch.float32, device="cuda")

    def accuracy(self, thr, cfg=None):
        """(rel_err of the kernel, rel_err of cuBLAS on the masked input), both vs fp32."""
        from .gemv import _launch, sparse_gemv, sparse_gemv_reference

        x, wt = self.x, self.wt[0]
        ref = sparse_gemv_reference(x.float(), wt, thr, self.splits).double()
        y = (sparse_gemv(x, wt, thr, self.splits) if cfg is None
             else _launch(x.reshape(-1), wt, thr, self.splits, None, cfg)).double()
        outs, start = [], 0
        for i, n in enumerate(self.splits):
            xm = torch.where(x.float().abs() > thr[i], x, torch.zeros_like(x))
            outs.append(torch.nn.functional.linear(xm, self.w[0][start:start + n]))
            start += n
        yd = torch.cat(outs, -1).double()
        den = ref.norm().clamp_min(1e-30)
        return float((y - ref).norm() / den), float((yd - ref).norm() / den)


def bench(shapes=None, dtypes=("bf16", "fp16"), sparsities=SPARSITIES, n_calls=200, reps=10,
          progress=True):
    """Records (one per shape x dtype x sparsity) and the copy rate."""
    from tqdm.auto import tqdm

    shapes = shapes or list(SHAPES)
    copy = copy_rate_gbps()
    records = []
    jobs = [(name, dt) for dt in dtypes for name in shapes]
    for name, dt in tqdm(jobs, desc="bench-gemv", disable=not progress):
        N, K, splits = SHAPES[name]
        dtype = DTYPES[dt]
        sb = ShapeBench(N, K, splits, dtype)
        esize = torch.tensor([], dtype=dtype).element_size()
        for s in sparsities:
            thr = sb.thresholds(s)
            realized = float((sb.x.float().abs() <= thr[0]).float().mean())
            dense = sb.dense_us(n_calls=n_calls, reps=reps)
            sparse = sb.sparse_us(thr, n_calls=n_calls, reps=reps)
            accum = sb.accum_us(thr, n_calls=n_calls, reps=reps)
            err, err_cublas = sb.accuracy(thr)
            gbps = (1 - realized) * N * K * esize / (sparse * 1e-6) / 1e9
            records.append(dict(
                shape=name, N=N, K=K, splits=list(sb.splits), dtype=dt, sparsity=s,
                realized_sparsity=round(realized, 5), dense_us=round(dense, 3),
                sparse_us=round(sparse, 3), speedup=round(dense / sparse, 4),
                ideal=round(1 / (1 - s), 4), rel_err=err, rel_err_cublas_masked=err_cublas,
                accum_us=round(accum, 3), accum_speedup=round(dense / accum, 4),
                rel_err_accum=sb.accum_error(thr),
                gbps_retained=round(gbps, 1), pct_copy=round(100 * gbps / copy, 2),
            ))
        del sb
        torch.cuda.empty_cache()
    return records, copy


def layer_summary(records):
    """Whole Llama-3-8B layer per (dtype, s): unfused (7 launches) and fused (qkv, o, gate_up, down)."""
    by = {(r["shape"], r["dtype"], r["sparsity"]): r for r in records}
    unfused = {"q|o": 2, "k|v": 2, "gate|up": 2, "down": 1}
    fused = {"qkv_fused": 1, "q|o": 1, "gate_up_fused": 1, "down": 1}
    out = []
    for dt in sorted({r["dtype"] for r in records}):
        for s in sorted({r["sparsity"] for r in records}):
            row = dict(dtype=dt, sparsity=s, ideal=round(1 / (1 - s), 4))
            for label, parts, key in (("unfused", unfused, "sparse_us"), ("fused", fused, "sparse_us"),
                                      ("fused_accum", fused, "accum_us")):
                try:
                    d = sum(by[(n, dt, s)]["dense_us"] * m for n, m in parts.items())
                    sp = sum(by[(n, dt, s)][key] * m for n, m in parts.items())
                except KeyError:
                    continue
                row[f"dense_{label}_us"] = round(d, 2)
                row[f"sparse_{label}_us"] = round(sp, 2)
                row[f"speedup_{label}"] = round(d / sp, 4)
            if "speedup_fused" in row and "speedup_unfused" in row:
                best_dense = min(row["dense_unfused_us"], row["dense_fused_us"])
                row["speedup_fused_vs_best_dense"] = round(best_dense / row["sparse_fused_us"], 4)
            if len(row) > 3:
                out.append(row)
    return out


FUSED_LAYER = ("qkv_fused", "q|o", "gate_up_fused", "down")


def _dense_chain_us(sbs, n_calls, reps) -> float:
    """cuBLAS over the shapes of `sbs` back to back (each its own rotating weight copies), in one
    CUDA graph: microseconds per pass over all of them."""
    F = torch.nn.functional.linear
    copies = max(len(sb.w) for sb in sbs)
    return graph_us([lambda i=i, sb=sb: F(sb.x, sb.w[i % len(sb.w)]) for i in range(copies) for sb in sbs],
                    n_calls=n_calls, reps=reps) * len(sbs)


def layer_chain(dtypes=("bf16", "fp16"), sparsities=(0.0, 0.25, 0.4, 0.5, 0.65), n_calls=400, reps=10):
    """A whole Llama-3-8B layer timed as the decoder runs it: its four fused projections back to
    back in one CUDA graph (qkv, o, gate_up, down, then the next layer's qkv, ...), each from its
    own rotating weight copies, so every kernel follows a different one (the per-shape figures
    follow the same kernel, which flatters launch overlap such as PDL). Dense: cuBLAS in the
    same chain. One record per (dtype, s), microseconds per layer."""
    from .gemv import sparse_gemv

    out = []
    for dt in dtypes:
        sbs = [ShapeBench(*SHAPES[n], DTYPES[dt]) for n in FUSED_LAYER]
        copies = max(len(sb.w) for sb in sbs)
        order = [(i, sb) for i in range(copies) for sb in sbs]
        dense = _dense_chain_us(sbs, n_calls, reps)
        for s in sparsities:
            thr = {id(sb): sb.thresholds(s) for sb in sbs}
            sparse = graph_us([lambda i=i, sb=sb: sparse_gemv(sb.x, sb.wt[i % len(sb.wt)], thr[id(sb)],
                                                              sb.splits) for i, sb in order],
                              n_calls=n_calls, reps=reps) * len(sbs)
            out.append(dict(dtype=dt, sparsity=s, ideal=round(1 / (1 - s), 4), dense_us=round(dense, 2),
                            sparse_us=round(sparse, 2), speedup=round(dense / sparse, 4)))
        del sbs
        torch.cuda.empty_cache()
    return out


def layer_chain_fused(dtypes=("bf16", "fp16"), sparsities=(0.0, 0.25, 0.4, 0.5, 0.65), n_calls=400,
                      reps=10, eps=1e-5):
    """A whole Llama-3-8B layer with the decoder's fusions (sparse_gemv_into), timed as a chain like
    layer_chain: qkv and gate/up read the fp32 residual stream r and compute the RMSNorm inside the
    kernel (norm_weight), adding into fp32 buffers that the launch before has zeroed (o clears
    qkv's, qkv clears gate/up's); o and down add into the residual stream; down reads the
    gate/up buffer and computes SiLU x up itself. So the sparse chain also does the two norms and
    the two residual adds that the dense chain (the four cuBLAS projections alone) leaves out.
    Thresholds: the s-quantile of each projection's own input (realized sparsity recorded)."""
    from .gemv import glu_input, norm_input, sparse_gemv_into

    F = torch.nn.functional.linear
    out = []
    for dt in dtypes:
        dtype = DTYPES[dt]
        qkv, o, gu, down = (ShapeBench(*SHAPES[n], dtype) for n in FUSED_LAYER)
        g = torch.Generator(device="cuda").manual_seed(1)
        K = qkv.K
        r = torch.randn(K, device="cuda", generator=g)  # the residual stream, fp32
        nw = (1 + 0.1 * torch.randn(2, K, device="cuda", generator=g)).to(dtype)  # two norm weights
        bufs = {"qkv": torch.zeros(qkv.N, device="cuda"), "gu": torch.zeros(gu.N, device="cuda"),
                "res": torch.zeros(K, device="cuda")}
        xn = [norm_input(r, nw[i], eps) for i in range(2)]
        gu_out = F(xn[1], gu.w[0]).float()  # what the gate/up launch leaves in its buffer
        inputs = {"qkv": xn[0], "o": o.x.reshape(-1), "gu": xn[1], "down": glu_input(gu_out, dtype)}
        copies = max(len(sb.w) for sb in (qkv, o, gu, down))
        dense = _dense_chain_us((qkv, o, gu, down), n_calls, reps)
        for s in sparsities:
            thr = {k: torch.full((n,), threshold_for(v, s), device="cuda") for (k, v), n in
                   zip(inputs.items(), (3, 1, 2, 1))}
            realized = {k: float((v.float().abs() <= thr[k][0]).float().mean()) for k, v in inputs.items()}
            calls = []
            for i in range(copies):
                calls += [
                    lambda i=i: sparse_gemv_into(bufs["qkv"], r, qkv.wt[i % len(qkv.wt)], thr["qkv"], qkv.splits,
                                                 norm_weight=nw[0], eps=eps, clear=bufs["gu"]),
                    lambda i=i: sparse_gemv_into(bufs["res"], o.x, o.wt[i % len(o.wt)], thr["o"], clear=bufs["qkv"]),
                    lambda i=i: sparse_gemv_into(bufs["gu"], r, gu.wt[i % len(gu.wt)], thr["gu"], gu.splits,
                                                 norm_weight=nw[1], eps=eps),
                    lambda i=i: sparse_gemv_into(bufs["res"], bufs["gu"], down.wt[i % len(down.wt)], thr["down"],
                                                 glu=True),
                ]
            sparse = graph_us(calls, n_calls=n_calls, reps=reps) * 4
            out.append(dict(dtype=dt, sparsity=s, ideal=round(1 / (1 - s), 4), dense_us=round(dense, 2),
                            sparse_us=round(sparse, 2), speedup=round(dense / sparse, 4),
                            realized={k: round(v, 4) for k, v in realized.items()}))
        del qkv, o, gu, down
        torch.cuda.empty_cache()
    return out


def provenance(command: str) -> dict:
    import datetime
    import os
    import subprocess

    import triton

    def git(*a):
        try:
            return subprocess.run(["git", *a], capture_output=True, text=True, check=True).stdout.strip()
        except Exception:
            return None

    sha = os.environ.get("TEAL_GIT_SHA")
    prov = dict(git_sha=sha or git("rev-parse", "HEAD"))
    if not sha:
        # Whether the kernels differ from that commit. Not asked when TEAL_GIT_SHA names the commit:
        # a copied tree (the remote GPU machine's) carries git metadata that need not match it.
        prov["git_dirty_kernels"] = bool(git("status", "--porcelain", "--untracked-files=no", "teal_nb/kernels"))
    return dict(
        prov, gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        cuda=torch.version.cuda, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=command,
    )


def table(records, sparsities=(0.0, 0.25, 0.4, 0.5, 0.65)) -> str:
    lines = []
    for dt in sorted({r["dtype"] for r in records}):
        lines.append(f"{dt}: speedup over cuBLAS (ideal 1/(1-s))")
        lines.append(f"{'shape':20s}" + "".join(f"  s={s:<5}" for s in sparsities))
        for name in dict.fromkeys(r["shape"] for r in records):
            row = {r["sparsity"]: r for r in records if r["shape"] == name and r["dtype"] == dt}
            lines.append(f"{name:20s}" + "".join(
                f"  {row[s]['speedup']:6.2f} " if s in row else "     -  " for s in sparsities))
    return "\n".join(lines)
