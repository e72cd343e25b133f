"""Sparse GEMV kernel vs its pure-torch reference.

On CPU the Triton kernel runs under TRITON_INTERPRET=1 (set by conftest.py before the kernel is
defined), so shapes stay small; block sizes are forced small too (`_launch` with an explicit
config) so that odd shapes span several output blocks and several K slices (split-K, the
arrival counter and both reductions are exercised). On a GPU the same tests run compiled.
"""
import math

import pytest
import torch

from teal_nb.kernels import (glu_input, norm_input, prepare_weight, sparse_gemv, sparse_gemv_into,
                             sparse_gemv_into_reference, sparse_gemv_reference)
from teal_nb.kernels.gemv import HAVE_TRITON, INTERPRET, _launch

DEV = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL = HAVE_TRITON and (DEV == "cuda" or INTERPRET)
needs_kernel = pytest.mark.skipif(not KERNEL, reason="no GPU and TRITON_INTERPRET is not set")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Configs (teal_nb.kernels.gemv.Config: BLOCK_N, BLOCK_K, warps, PROGS_PER_SM, REDUCE, SLICE,
# DEPTH, PDL, SCAN, PRODUCER), blocks small so that odd shapes need several output blocks, K
# slices and tiles per slice. SLICE = 0: the masked kernel; SLICE > 0: the compacting one.
CFGS = [
    (32, 16, 4, 2, 0, 0),                      # masked, atomic split-K
    (16, 8, 4, 3, 1, 0),                       # masked, deterministic split-K
    (32, 8, 4, 0, 0, 32),                      # compacting, atomic split-K, 1 tile in flight
    (16, 16, 4, 0, 1, 64, 2, 0, 16),           # deterministic, 2 in flight, prefix sum in 16s
    (16, 8, 1, 0, 0, 1 << 30, 2, 0, 32),       # one slice = all of K: no split-K; sum in 32s
    (32, 16, 2, 0, 0, 48, 2, 0, 0, 1),         # kept list from the producer kernel
    (256, 8, 1, 0, 0, 40, 2),                  # rows summed as they arrive (SUM_ROWS, 1-D acc)
    (32, 8, 4, 0, 1, 48, 1, 0, 0, 0, 0, -1, 3),  # 3 programs split each slice's kept list (SHARE)
]
# Tolerance: fp32 accumulation of products of dtype inputs; the output is rounded to the dtype.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_err(y, ref):
    y, ref = y.double(), ref.double()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


def make(N, K, dtype, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g).to(dtype)
    x = torch.randn(K, generator=g).to(dtype)
    t = float(torch.quantile(x.float().abs(), s)) if s > 0 else 0.0
    return w.to(DEV), x.to(DEV), t


def ref32(x, wt, thr, splits=None, bias=None):
    """The reference in fp32 throughout (output not rounded to x's dtype)."""
    return sparse_gemv_reference(x.float(), wt, thr, splits, None if bias is None else bias.float())


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,K", [(100, 70), (33, 129), (257, 48)])
@pytest.mark.parametrize("s", [0.0, 0.9])
def test_odd_shapes(dtype, N, K, s):
    w, x, t = make(N, K, dtype, s, seed=N + K)
    wt = prepare_weight(w)
    thr = torch.tensor([t], device=DEV)
    ref = ref32(x, wt, thr)
    for cfg in CFGS if DEV == "cuda" else CFGS[(N + int(10 * s)) % 2::2]:  # CPU: half, in turn
        y = _launch(x, wt, thr, (N,), None, cfg)
        assert y.dtype == dtype and y.shape == (N,)
        assert rel_err(y, ref) < TOL[dtype], cfg


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("s", [0.0, 0.25, 0.5, 0.65, 0.8, 0.99])
def test_sparsities_public_api(dtype, s):
    N, K = 96, 96
    w, x, t = make(N, K, dtype, s, seed=int(100 * s))
    wt = prepare_weight(w)
    thr = torch.tensor([t], device=DEV)
    y = sparse_gemv(x[None], wt, thr)  # [1, K] -> [1, N], default (tuned) config
    assert y.shape == (1, N) and y.dtype == dtype
    ref = ref32(x[None], wt, thr)
    assert rel_err(y, ref) < TOL[dtype]
    # the dropped fraction is what was asked for
    assert abs(float((x.float().abs() <= t).float().mean()) - s) <= 1.5 / K + (0 if s else 0)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_keep_all_keep_none(dtype):
    N, K = 50, 90
    w, x, _ = make(N, K, dtype, 0.0)
    x = torch.where(x == 0, torch.ones_like(x), x)
    wt = prepare_weight(w)
    dense = (x.float() @ w.float().t())
    for t, cfg in ((-1.0, CFGS[0]), (0.0, CFGS[4])):  # keeps everything
        y = _launch(x, wt, torch.tensor([t], device=DEV), (N,), None, cfg)
        assert rel_err(y, dense) < TOL[dtype]
    for cfg in (CFGS[1], CFGS[5], CFGS[7]):  # keeps nothing
        y = _launch(x, wt, torch.tensor([math.inf], device=DEV), (N,), None, cfg)
        assert torch.equal(y.float(), torch.zeros(N, device=DEV))


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", CFGS[1:3] + CFGS[4:])
def test_nan_inf_like_reference(dtype, cfg):
    """Rule: keep |x| > t. NaN compares false -> dropped; +-inf kept unless t = inf; t < 0 keeps
    everything, NaN included (the dense product)."""
    N, K = 40, 48
    w, x, t = make(N, K, dtype, 0.3)
    x[3] = float("nan")
    wt = prepare_weight(w)
    thr = torch.tensor([t], device=DEV)
    y = _launch(x, wt, thr, (N,), None, cfg)
    ref = sparse_gemv_reference(x, wt, thr)
    assert not y.isnan().any()  # the NaN channel was dropped
    assert rel_err(y, ref) < TOL[dtype]
    x[7] = float("inf")
    x[9] = float("-inf")
    y = _launch(x, wt, thr, (N,), None, cfg)
    ref = sparse_gemv_reference(x, wt, thr)
    assert torch.equal(y.isnan(), ref.isnan())
    assert torch.equal(y.isinf(), ref.isinf())
    fin = ref.isfinite()
    assert torch.equal(y[~fin].float().nan_to_num(), ref[~fin].float().nan_to_num())
    # t = inf drops the infinities too
    inf_thr = torch.tensor([math.inf], device=DEV)
    assert torch.equal(_launch(x, wt, inf_thr, (N,), None, cfg).float(), torch.zeros(N, device=DEV))
    # a negative threshold is the dense product: NaN kept, as cuBLAS would
    x[7] = x[9] = 0.0
    for neg in (-1.0, -math.inf):
        y = _launch(x, wt, torch.tensor([neg], device=DEV), (N,), None, cfg)
        assert y.isnan().all() and sparse_gemv_reference(x, wt, torch.tensor([neg], device=DEV)).isnan().all()
    x[3] = 1.0
    dense = (x.float() @ wt.float()).to(dtype)
    assert rel_err(_launch(x, wt, torch.tensor([-math.inf], device=DEV), (N,), None, cfg), dense.float()) < TOL[dtype]


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_segments_and_bias(dtype):
    """Fused QKV-like: one launch, three thresholds; splits aligned and not aligned to BLOCK_N."""
    for splits in [(64, 32, 32), (48, 24, 24), (40, 40)]:
        N, K = sum(splits), 40
        w, x, _ = make(N, K, dtype, 0.0, seed=N)
        q = torch.tensor([0.2, 0.5, 0.8][:len(splits)])
        thr = torch.quantile(x.float().abs().cpu(), q).float().to(DEV)
        bias = torch.randn(N).to(dtype).to(DEV)
        wt = prepare_weight(w)
        ref = ref32(x, wt, thr, splits, bias)
        for cfg in CFGS if DEV == "cuda" else CFGS[len(splits) % 2::2]:
            y = _launch(x, wt, thr, splits, bias, cfg)
            assert rel_err(y, ref) < TOL[dtype], (splits, cfg)
        # the segments really use different thresholds
        one = ref32(x, wt, thr[:1].expand(len(splits)).contiguous(), splits, bias)
        assert rel_err(one, ref) > 1e-2
        y = sparse_gemv(x, wt, thr, splits, bias)
        assert rel_err(y, ref) < TOL[dtype]


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_glu_input_fused_like_reference(dtype):
    """down_proj fed with [gate | up]: the kernel computes silu(gate) * up as it reads x, and gives
    the reference on glu_input(x) (the interpreter rounds fp32 -> bf16 by truncation, the GPU to
    nearest: the tolerance is the dtype's)."""
    K, N = 130, 257
    g = torch.Generator().manual_seed(3)
    w = torch.randn(N, K, generator=g).to(dtype).to(DEV)
    x = (2 * torch.randn(2 * K, generator=g)).to(dtype).to(DEV)
    wt, xi = prepare_weight(w), glu_input(x)
    a = xi.float().abs().sort().values.cpu()
    for s in (0.0, 0.5, 0.95):
        # A threshold in the widest gap between |x| values near the s-quantile: a value that
        # rounds differently (see above) must not cross it.
        i = max(range(max(1, int(s * K) - 5), int(s * K) + 6), key=lambda j: a[j] - a[j - 1])
        thr = torch.tensor([float(a[i] + a[i - 1]) / 2 if s else 0.0], device=DEV)
        ref = ref32(xi, wt, thr)
        assert rel_err(sparse_gemv_reference(x, wt, thr, glu=True), ref) < TOL[dtype]
        for cfg in (CFGS[0], CFGS[2], CFGS[5], CFGS[6]):  # masked (glu_input first), compacting, producer
            assert rel_err(_launch(x, wt, thr, (N,), None, cfg, glu=True), ref) < TOL[dtype], (s, cfg)
        y = sparse_gemv(x[None, None], wt, thr, glu=True)
        assert y.shape == (1, 1, N) and rel_err(y[0, 0], ref) < TOL[dtype]
    with pytest.raises(ValueError, match="2K"):
        sparse_gemv(x[:K], wt, thr, glu=True)


def _into_case(mode, dtype, K, N, seed):
    """(x, kwargs) for sparse_gemv_into: plain x [K], the residual stream + a norm weight, or
    [gate | up] (fp32, as the decoder's gate/up buffer)."""
    g = torch.Generator().manual_seed(seed)
    if mode == "norm":
        return (3 * torch.randn(K, generator=g)).to(DEV), dict(
            norm_weight=(0.5 + torch.rand(K, generator=g)).to(dtype).to(DEV), eps=1e-5)
    if mode == "glu":
        return (2 * torch.randn(2 * K, generator=g)).to(DEV), dict(glu=True)
    return torch.randn(K, generator=g).to(dtype).to(DEV), {}


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["plain", "norm", "glu"])
@pytest.mark.parametrize("cfg", [CFGS[0], CFGS[2], CFGS[3], CFGS[5], CFGS[6], CFGS[7]])
def test_into_accumulates_like_reference(dtype, mode, cfg):
    """sparse_gemv_into adds the masked product to out (fp32, no rounding), computes the RMSNorm
    or SiLU x up of its input inside the kernel, adds the bias once (not once per K slice) and
    zeroes `clear`; fused segments, not aligned to the blocks for one case."""
    K, N = 70, 100
    w, _, _ = make(N, K, dtype, 0.0, seed=5)
    wt = prepare_weight(w)
    x, kw = _into_case(mode, dtype, K, N, seed=6)
    bias = torch.randn(N).to(dtype).to(DEV)
    xin = norm_input(x, kw["norm_weight"], 1e-5) if mode == "norm" else glu_input(x, dtype) if mode == "glu" else x
    a = xin.float().abs().sort().values.cpu()
    # Thresholds in wide gaps between |input| values (the interpreter rounds fp32 -> bf16 by
    # truncation, the GPU to nearest: a value must not cross a threshold by rounding).
    gaps = [max(range(lo, lo + 10), key=lambda j: a[j] - a[j - 1]) for lo in (20, 45)]
    thr = torch.tensor([float(a[i] + a[i - 1]) / 2 for i in gaps], device=DEV)
    for splits in ((32, 68), (40, 60)):
        out0 = torch.randn(N, device=DEV)
        ref, out = out0.clone(), out0.clone()
        clear, ref_clear = torch.randn(37, device=DEV), torch.randn(37, device=DEV)
        sparse_gemv_into_reference(ref, x, wt, thr, splits, bias, clear=ref_clear, **kw)
        _launch(x, wt, thr, splits, bias, cfg, kw.get("glu", False), out, clear, kw.get("norm_weight"))
        # The product alone (out - out0) against the reference's, at the dtype's tolerance (fp32:
        # the only differences are the order of the sums).
        tol = 1e-5 if dtype == torch.float32 else TOL[dtype]
        assert rel_err(out - out0, ref - out0) < tol, (splits, cfg)
        assert not clear.any() and not ref_clear.any()
        # Not the other half of the rule: the reference itself is not the identity.
        assert rel_err(ref - out0, (xin.float() @ wt.float()) + bias.float()) > 1e-3
    if dtype == torch.float32 and mode != "plain":  # the public op, on one row
        out = torch.zeros(1, N, device=DEV)
        sparse_gemv_into(out, x[None], wt, thr, (32, 68), bias, **kw)
        ref = torch.zeros(1, N, device=DEV)
        sparse_gemv_into_reference(ref, x[None], wt, thr, (32, 68), bias, **kw)
        assert rel_err(out, ref) < 1e-5


def _partials(heads, splits, d, empty, seed):
    """Split-attention partials [heads, splits, d + 2] (values, max, sum) with `empty` splits
    (m = -inf, l = 0) at the end, as decode_attention_partials leaves them."""
    g = torch.Generator().manual_seed(seed)
    part = torch.randn(heads, splits, d + 2, generator=g)
    part[:, :, d + 1] = part[:, :, d + 1].abs() + 0.5
    part[:, splits - empty:] = 0
    part[:, splits - empty:, d] = float("-inf")
    return part.to(DEV)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", [CFGS[0], CFGS[2], CFGS[5]])
def test_into_partials_like_reference(dtype, cfg):
    """partials=True: the kernel combines a split attention's partials as it reads x (o_proj's
    input, attention_input: the softmax's split maxima and sums), then thresholds, multiplies and
    adds into out as the reference does; several splits empty."""
    from teal_nb.kernels import attention_input

    heads, splits, d, N = 5, 3, 12, 70
    part = _partials(heads, splits, d, 1, seed=9)
    w, _, _ = make(N, heads * d, dtype, 0.0, seed=8)
    wt = prepare_weight(w)
    xin = attention_input(part, dtype)
    a = xin.float().abs().sort().values.cpu()
    i = max(range(25, 35), key=lambda j: a[0, j] - a[0, j - 1])  # a threshold in a wide gap (see above)
    thr = torch.tensor([float(a[0, i] + a[0, i - 1]) / 2], device=DEV)
    out0 = torch.randn(N, device=DEV)
    ref, out = out0.clone(), out0.clone()
    sparse_gemv_into_reference(ref, part, wt, thr, partials=True)
    _launch(part.reshape(-1), wt, thr, (N,), None, cfg, out=out, partials=(splits, d))
    tol = 1e-5 if dtype == torch.float32 else TOL[dtype]
    assert rel_err(out - out0, ref - out0) < tol, cfg
    assert rel_err(ref - out0, xin.float() @ wt.float()) > 1e-3  # the threshold dropped something
    if dtype == torch.float32:  # the public op
        out = torch.zeros(1, N, device=DEV)
        sparse_gemv_into(out, part, wt, thr, partials=True)
        assert rel_err(out[0], ref - out0) < 1e-5
    with pytest.raises(ValueError, match="partials"):
        sparse_gemv_into(torch.zeros(1, N, device=DEV), part[:, :, 1:], wt, thr, partials=True)
    with pytest.raises(ValueError, match="exclude"):
        sparse_gemv_into(torch.zeros(1, N, device=DEV), part, wt, thr, partials=True, glu=True)


def test_attention_input_is_softmax_of_the_union():
    """attention_input, closed form: splitting a softmax-weighted sum into chunks (each with its
    own max and sum) and combining them gives the softmax over all rows at once."""
    from teal_nb.kernels import attention_input

    g = torch.Generator().manual_seed(2)
    heads, d, rows = 3, 8, 10
    sc, v = torch.randn(heads, rows, generator=g), torch.randn(heads, rows, d, generator=g)
    want = torch.einsum("hs,hsd->hd", torch.softmax(sc, dim=-1), v).reshape(1, -1)
    part = torch.zeros(heads, 4, d + 2)
    part[:, :, d] = float("-inf")
    for c, sl in enumerate((slice(0, 3), slice(3, 4), slice(4, 10))):  # the fourth split empty
        m = sc[:, sl].max(1).values
        w = torch.exp(sc[:, sl] - m[:, None])
        part[:, c, :d] = torch.einsum("hs,hsd->hd", w, v[:, sl])
        part[:, c, d], part[:, c, d + 1] = m, w.sum(1)
    assert torch.allclose(attention_input(part, torch.float32), want, atol=1e-6)


def test_into_norm_input_is_hf_rms_norm():
    """norm_input (the kernel's twin) is the decoder's rms_norm of the residual stream, as HF."""
    from teal_nb.decode import rms_norm

    r = torch.randn(2, 3, 64).bfloat16()
    w = torch.rand(64).bfloat16() + 0.5
    assert torch.equal(norm_input(r, w, 1e-5), rms_norm(r, w, 1e-5))


@pytest.mark.parametrize("mode", ["plain", "norm", "glu"])
def test_into_multi_row_path(mode):
    """Several rows: the reference, row by row (every row accumulated)."""
    K, N = 24, 40
    w, _, _ = make(N, K, torch.float32, 0.0)
    wt = prepare_weight(w)
    x1, kw = _into_case(mode, torch.float32, K, N, seed=7)
    x = torch.stack([x1, -x1, 2 * x1])
    thr = torch.tensor([0.3, 0.7], device=DEV)
    out = torch.ones(3, N, device=DEV)
    sparse_gemv_into(out, x, wt, thr, (16, 24), **kw)
    for i in range(3):
        ref = torch.ones(N, device=DEV)
        sparse_gemv_into_reference(ref, x[i], wt, thr, (16, 24), **kw)
        assert rel_err(out[i], ref) < 1e-6


def test_into_bad_arguments():
    wt = torch.zeros(4, 6)
    x, thr = torch.zeros(4), torch.tensor([0.0])
    with pytest.raises(ValueError, match="fp32"):
        sparse_gemv_into(torch.zeros(6, dtype=torch.bfloat16), x, wt, thr)
    with pytest.raises(ValueError, match="values"):
        sparse_gemv_into(torch.zeros(5), x, wt, thr)
    with pytest.raises(ValueError, match="exclude"):
        sparse_gemv_into(torch.zeros(6), torch.zeros(8), wt, thr, glu=True, norm_weight=torch.ones(4))
    with pytest.raises(ValueError, match="norm_weight"):
        sparse_gemv_into(torch.zeros(6), x, wt, thr, norm_weight=torch.ones(5))
    buf = torch.zeros(20)
    with pytest.raises(ValueError, match="overlaps out"):
        sparse_gemv_into(buf[:6], x, wt, thr, clear=buf[4:10])
    with pytest.raises(ValueError, match="overlaps x"):
        sparse_gemv_into(buf[:6], buf[10:14], wt, thr, clear=buf[12:20])
    out = torch.ones(6)
    with pytest.raises(ValueError):
        sparse_gemv_into(out, torch.zeros(5), wt, thr)
    assert torch.equal(out, torch.ones(6))  # nothing written on a refused call


def test_prepare_weight_fuses_lists():
    wq, wk = torch.randn(8, 6), torch.randn(4, 6)
    wt = prepare_weight([wq, wk])
    assert wt.shape == (6, 12) and wt.is_contiguous()
    assert torch.equal(wt, torch.cat([wq, wk]).t())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_multi_row_path(dtype):
    """Several tokens never take the one-token kernel, and are still right."""
    N, K = 48, 40
    w, _, _ = make(N, K, dtype, 0.0)
    x = torch.randn(2, 3, K).to(dtype).to(DEV)
    thr = torch.tensor([0.3, 0.7], device=DEV)
    wt = prepare_weight(w)
    y = sparse_gemv(x, wt, thr, (16, 32))
    assert y.shape == (2, 3, N) and y.dtype == dtype
    assert rel_err(y, ref32(x, wt, thr, (16, 32))) < TOL[dtype]


def test_reference_masks_explicitly():
    x = torch.tensor([0.1, -0.5, 2.0, float("nan")])
    wt = torch.eye(4)
    y = sparse_gemv_reference(x, wt, torch.tensor([0.4]))
    assert torch.equal(y, torch.tensor([0.0, -0.5, 2.0, 0.0]))


def test_bad_arguments():
    wt = torch.zeros(4, 6)
    with pytest.raises(ValueError):
        sparse_gemv(torch.zeros(5), wt, torch.tensor([0.0]))
    with pytest.raises(ValueError):
        sparse_gemv(torch.zeros(4), wt, torch.tensor([0.0, 1.0]), (3, 2))
    with pytest.raises(ValueError):
        sparse_gemv(torch.zeros(4), wt, torch.tensor([0.0]), (3, 3))


@needs_kernel
def test_custom_op_under_torch_compile():
    """The op traces (fake impl) and runs inside a compiled graph.

    backend="aot_eager" checks the op's registration and fake tensor without compiling C++ /
    Triton code for the surrounding graph (inductor on CPU needs a C++ toolchain and minutes).
    """
    N, K = 24, 32
    w, x, t = make(N, K, torch.float32, 0.5)
    wt = prepare_weight(w)
    thr = torch.tensor([t], device=DEV)

    def f(x):
        return torch.relu(sparse_gemv(x, wt, thr)) * 2

    torch._dynamo.reset()
    y = torch.compile(f, backend="aot_eager", fullgraph=True)(x[None])
    assert rel_err(y, torch.relu(ref32(x[None], wt, thr)) * 2) < 1e-5
    gu = torch.cat([x, x.flip(0)])[None]  # [gate | up] for the glu input
    y = torch.compile(lambda v: sparse_gemv(v, wt, thr, glu=True), backend="aot_eager", fullgraph=True)(gu)
    assert y.shape == (1, N) and rel_err(y, sparse_gemv_reference(gu, wt, thr, glu=True)) < 1e-5
    assert hasattr(torch.ops.teal_nb, "sparse_gemv")
    # The mutating op: out and clear are updated in place by the compiled graph.
    out, clear = torch.ones(1, N, device=DEV), torch.ones(5, device=DEV)

    def g(x):
        sparse_gemv_into(out, x, wt, thr, clear=clear)
        return out * 2

    y = torch.compile(g, backend="aot_eager", fullgraph=True)(x[None])
    ref = torch.ones(1, N, device=DEV) + ref32(x[None], wt, thr)
    assert rel_err(out, ref) < 1e-5 and rel_err(y, 2 * ref) < 1e-5 and not clear.any()


@pytest.mark.skipif(DEV != "cuda", reason="CUDA graphs need a GPU")
def test_cuda_graph_capture_and_determinism():
    N, K = 4096, 4096
    for dtype in (torch.bfloat16, torch.float16):
        w, x, t = make(N, K, dtype, 0.5)
        wt = prepare_weight(w)
        thr = torch.tensor([t], device=DEV)
        ref = ref32(x, wt, thr)
        sparse_gemv(x, wt, thr)  # compiled before the capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            yg = sparse_gemv(x, wt, thr)
        for _ in range(3):
            g.replay()
            torch.cuda.synchronize()
            assert rel_err(yg, ref) < TOL[dtype]
        # A graph of back-to-back PDL launches (programmatic edges between the kernel nodes).
        cfg = (512, 16, 4, 0, 0, 128, 1, 1)
        _launch(x, wt, thr, (N,), None, cfg)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            ys = [_launch(x, wt, thr, (N,), None, cfg) for _ in range(8)]
        for _ in range(3):
            g.replay()
            torch.cuda.synchronize()
            assert max(rel_err(yi, ref) for yi in ys) < TOL[dtype]
        for red, slice_, st, pdl in ((0, 0, 1, 0), (1, 0, 1, 0), (0, 512, 1, 0), (1, 256, 2, 0),
                                     (0, 4096, 2, 0), (1, 512, 2, 0), (0, 512, 1, 1), (0, 0, 1, 1)):
            outs = [_launch(x, wt, thr, (N,), None, (128, 32, 4, 4, red, slice_, st, pdl))
                    for _ in range(20)]
            for o in outs:
                assert rel_err(o, ref) < TOL[dtype]
            if red == 1:  # fixed summation order: bitwise reproducible
                assert all(torch.equal(o, outs[0]) for o in outs)


@pytest.mark.skipif(DEV != "cuda", reason="a race needs a GPU")
def test_split_k_reduction_has_no_race():
    """Regression (H200): (1024 columns, 4 warps) configs gave rel_err ~0.1 now and then (the last
    program zeroed scratch that another of its threads had not yet read). Many back-to-back
    calls, every one checked, and the scratch clean afterwards."""
    from teal_nb.kernels.gemv import _SCRATCH

    splits = (14336, 14336)
    w, x, _ = make(sum(splits), 4096, torch.bfloat16, 0.0)
    wt = prepare_weight(w)
    for s in (0.0, 0.5):
        thr = torch.full((2,), float(torch.quantile(x.float().abs(), s)) if s else 0.0, device=DEV)
        ref = ref32(x, wt, thr, splits)
        for cfg in [(1024, 8, 4, 0, 0, 456, 1), (1024, 8, 4, 0, 0, 512, 1), (1024, 8, 4, 0, 0, 224, 1),
                    (1024, 8, 8, 0, 0, 456, 2), (512, 16, 4, 0, 0, 128, 1), (64, 64, 4, 4, 0, 0),
                    (1024, 8, 4, 0, 1, 512, 1),
                    # with programmatic dependent launch: call i+1 starts while call i finishes
                    (1024, 8, 4, 0, 0, 456, 1, 1), (512, 16, 4, 0, 0, 128, 1, 1), (64, 64, 4, 4, 0, 0, 0, 1)]:
            outs = [_launch(x, wt, thr, splits, None, cfg) for _ in range(40)]
            errs = [rel_err(o, ref) for o in outs]
            assert max(errs) < TOL[torch.bfloat16], (s, cfg, max(errs))
            acc, _, cnt, _, _ = _SCRATCH[("cuda", torch.device(DEV).index or 0)]
            torch.cuda.synchronize()
            assert not acc.any() and not cnt.any()


@pytest.mark.skipif(DEV != "cuda", reason="a race needs a GPU")
def test_into_chain_in_cuda_graph():
    """The decoder's chain with sparse_gemv_into on the package's configs, captured in a CUDA
    graph and replayed: qkv (norm inside) adds into a buffer the o launch zeroes, gate/up (norm
    inside) into one the qkv launch zeroes, o and down (SiLU x up inside) into the residual
    stream. Every replay checked against the references: a clear racing a read would show."""
    for dtype in (torch.bfloat16, torch.float16):
        K, I = 4096, 14336
        g = torch.Generator(device=DEV).manual_seed(0)
        wq, wo = (torch.randn(n, k, device=DEV, generator=g).to(dtype) for n, k in ((6144, K), (K, K)))
        wgu, wd = (torch.randn(n, k, device=DEV, generator=g).to(dtype) for n, k in ((2 * I, K), (K, I)))
        wts = [prepare_weight(w) for w in (wq, wo, wgu, wd)]
        r = torch.randn(K, device=DEV, generator=g)
        nw = (1 + 0.1 * torch.randn(K, device=DEV, generator=g)).to(dtype)
        xo = torch.randn(K, device=DEV, generator=g).to(dtype)
        thr = {n: torch.full((m,), 0.5, device=DEV) for n, m in (("qkv", 3), ("o", 1), ("gu", 2), ("down", 1))}
        qkv_buf, gu_buf, res = torch.zeros(6144, device=DEV), torch.zeros(2 * I, device=DEV), torch.zeros(K, device=DEV)

        def chain():
            sparse_gemv_into(qkv_buf, r, wts[0], thr["qkv"], (4096, 1024, 1024), norm_weight=nw, clear=gu_buf)
            sparse_gemv_into(res, xo, wts[1], thr["o"], clear=qkv_buf)
            sparse_gemv_into(gu_buf, r, wts[2], thr["gu"], (I, I), norm_weight=nw)
            sparse_gemv_into(res, gu_buf, wts[3], thr["down"], glu=True)

        ref = {k: torch.zeros_like(v) for k, v in (("qkv", qkv_buf), ("gu", gu_buf), ("res", res))}
        sparse_gemv_into_reference(ref["qkv"], r, wts[0], thr["qkv"], (4096, 1024, 1024), norm_weight=nw)
        sparse_gemv_into_reference(ref["res"], xo, wts[1], thr["o"])
        sparse_gemv_into_reference(ref["gu"], r, wts[2], thr["gu"], (I, I), norm_weight=nw)
        sparse_gemv_into_reference(ref["res"], ref["gu"], wts[3], thr["down"], glu=True)
        sparse_gemv_into(qkv_buf, r, wts[0], thr["qkv"], (4096, 1024, 1024), norm_weight=nw)
        assert rel_err(qkv_buf, ref["qkv"]) < TOL[dtype]
        qkv_buf.zero_()
        chain()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            chain()
        for _ in range(20):
            before = res.clone()
            graph.replay()
            torch.cuda.synchronize()
            assert not qkv_buf.any()  # cleared by o (after attention would have read it)
            assert rel_err(gu_buf, ref["gu"]) < TOL[dtype]
            assert rel_err(res - before, ref["res"]) < TOL[dtype]


def test_config_tables_pick_by_dtype_and_form():
    """Every tuned entry is a valid launch config; sparse_gemv_into takes ACCUM in both dtypes,
    sparse_gemv its own table per dtype."""
    from teal_nb.kernels import tuning
    from teal_nb.kernels.gemv import Config

    for table in (tuning.TABLE, tuning.FP16, tuning.ACCUM):
        for (N, K), c in table.items():
            cfg = Config(*c)
            assert cfg.block_n & (cfg.block_n - 1) == 0 and cfg.block_k & (cfg.block_k - 1) == 0, (N, K, c)
            assert cfg.depth in (1, 2) and cfg.slice >= 0, (N, K, c)
    for key, c in tuning.ACCUM.items():
        for dt in (torch.bfloat16, "bfloat16", torch.float16, None):
            assert tuning.config_for(*key, dt, accum=True) == c
        assert tuning.config_for(*key, torch.bfloat16) == tuning.TABLE[key]
        assert tuning.config_for(*key, torch.float16) == tuning.FP16.get(key, tuning.TABLE[key])


def test_programs_per_sm_closed_form():
    from teal_nb.kernels.ptxas import programs_per_sm

    # 65536 registers per SM, allotted per warp in steps of 8 per thread; at most 64 warps.
    assert programs_per_sm(104, 4) == 4  # 104 * 32 * 4 = 13312 -> 4.9
    assert programs_per_sm(167, 4) == 3  # rounded to 168: 21504 -> 3.05
    assert programs_per_sm(255, 4) == 2
    assert programs_per_sm(32, 1) == 32  # the block limit
    assert programs_per_sm(16, 16) == 4  # the warp limit


@pytest.mark.skipif(not HAVE_TRITON, reason="needs Triton")
def test_ptxas_row_sums_save_registers():
    """Compiled for the H200 (sm_90a) on this machine, no GPU: summing the tile's rows as they
    arrive (SUM_ROWS) leaves fewer registers than a tile of partial sums, and no spills; and the
    kernel builds for an A100 too."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # needs the compiler
    out = {}
    for flag in ("--sum-rows", "--no-sum-rows"):
        p = subprocess.run([sys.executable, "-m", "teal_nb.kernels.ptxas", "1024", "8", "4", "224", flag],
                           capture_output=True, text=True, env=env)
        if p.returncode and "ptxas" in p.stderr and "No such file" in p.stderr:
            pytest.skip("Triton's bundled ptxas is missing")
        assert p.returncode == 0, p.stderr[-2000:]
        out[flag] = json.loads(p.stdout)
    rows, tile = out["--sum-rows"], out["--no-sum-rows"]
    assert rows["registers"] < tile["registers"] and rows["spill_bytes"] == tile["spill_bytes"] == 0
    assert rows["programs_per_sm"] > tile["programs_per_sm"]
    # The same kernel builds for an A100 (sm_80: no programmatic dependent launch there).
    p = subprocess.run([sys.executable, "-m", "teal_nb.kernels.ptxas", "512", "16", "4", "192", "--arch", "80"],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 0 and json.loads(p.stdout)["arch"] == "sm_80", p.stderr[-2000:]
    # The accumulating form (sparse_gemv_into, with a clear and the norm inside) builds too, and
    # its SUM_ROWS kernel gets fewer registers than the counter's (kernels/README.md, item 13:
    # ptxas then issues the next tile's loads later, which is why tuning.ACCUM does without it).
    p = subprocess.run([sys.executable, "-m", "teal_nb.kernels.ptxas", "1024", "8", "4", "224", "--sum-rows",
                        "--accum", "--clear", "--norm"], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    accum = json.loads(p.stdout)
    assert accum["accum"] and accum["norm"] and accum["spill_bytes"] == 0
    assert accum["registers"] < rows["registers"]


@needs_kernel
def test_stamps_table_checked():
    """_launch's stamp table (kernels/gemv_timeline.py) is refused, before anything is launched,
    when it is too small, not int64, for the masked kernel, or for segments launched one by one."""
    K, N = 64, 96
    w, x, _ = make(N, K, torch.float32, 0.0)
    wt, thr, cfg = prepare_weight(w), torch.tensor([0.0], device=DEV), (32, 8, 4, 0, 0, 32)  # 3 x 2 programs
    for bad, c, splits in ((torch.zeros(5, 12, dtype=torch.int64), cfg, (N,)),
                           (torch.zeros(6, 12, dtype=torch.int32), cfg, (N,)),
                           (torch.zeros(6, 12, dtype=torch.int64), CFGS[0], (N,))):
        with pytest.raises(ValueError, match="12 int64 per program"):
            _launch(x, wt, thr, splits, None, c, stamps=bad.to(DEV))
    with pytest.raises(ValueError, match="not aligned"):
        _launch(x, wt, torch.tensor([0.0, 0.0], device=DEV), (40, 56), None, cfg,
                stamps=torch.zeros(6, 12, dtype=torch.int64, device=DEV))


def _lab_module(name: str):
    """kernels/<name>.py (the GPU lab's scripts are not a package), imported from its file."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "kernels" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_timeline_summary_closed_form():
    """kernels/gemv_timeline.py's summary of a stamp table (globaltimer ns and clock64 at five
    points per program, the SM in slot 10), on a table built by hand."""
    mod = _lab_module("gemv_timeline")
    # Two programs on SM 5, one on SM 7: entry, waited, listed, streamed, ended (ns, from 10 us).
    ns = torch.tensor([[0, 1000, 2000, 9000, 9500], [0, 1000, 3000, 10000, 10500], [500, 2000, 3000, 20000, 21000]])
    stamps = torch.zeros(3, 12, dtype=torch.int64)
    stamps[:, 0:10:2] = ns + 10_000
    stamps[:, 1:10:2] = 2 * ns  # 2 cycles per ns
    stamps[:, 10] = torch.tensor([5, 5, 7])
    r = mod.summarize(stamps)
    assert (r["programs"], r["sms"], r["max_programs_per_sm"]) == (3, 2, 2)
    assert r["entry_us"] == [-1.0, -1.0, -0.5] and r["waited_us"][0] == 0.0 and r["waited_us"][3] == 1.0
    assert r["chain_us"][1] == 1.0 and r["chain_cycles_median"] == 2000.0  # listed - waited
    assert r["stream_us"][1] == 7.0 and r["stream_us"][3] == 17.0  # streamed - listed
    assert r["ended_us"] == [9.5, 20.0] and r["tail_us"] == 10.5


def _same_sums(a, b):
    """Two launches' outputs agree to fp32 rounding, not bit for bit: each slice of K adds its
    partial sums into y atomically, in whatever order the programs finish (on the H200, launches
    with and without a switch differed in the last bits)."""
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _switch_case(mode, dtype, K, N):
    """(wt, x, kwargs, thresholds) for the tests of a launch-time switch of sparse_gemv_into."""
    w, _, _ = make(N, K, dtype, 0.0, seed=5)
    x, kw = _into_case(mode, dtype, K, N, seed=6)
    return prepare_weight(w), x, kw, torch.tensor([0.3], device=DEV)


@needs_kernel
def test_into_norm_preload_switch_same_sums(monkeypatch):
    """gemv.NORM_PRELOAD (the slice's residual and norm weight requested before the norm's sum)
    changes when the loads are issued, not what is computed: the same output either way (to the
    atomic adds' rounding)."""
    from teal_nb.kernels import gemv

    K, N, dtype = 70, 100, torch.bfloat16
    wt, x, kw, thr = _switch_case("norm", dtype, K, N)
    outs = []
    for on in (True, False):
        monkeypatch.setattr(gemv, "NORM_PRELOAD", on)
        for cfg in (CFGS[2], CFGS[5]):  # compacting; the producer kernel
            out = torch.zeros(N, device=DEV)
            _launch(x, wt, thr, (N,), None, cfg, out=out, norm_weight=kw["norm_weight"])
            outs.append(out)
    _same_sums(outs[0], outs[2])
    _same_sums(outs[1], outs[3])
    ref = torch.zeros(N, device=DEV)
    sparse_gemv_into_reference(ref, x, wt, thr, None, **kw)
    assert rel_err(outs[0], ref) < TOL[dtype]


@pytest.mark.skipif(DEV != "cuda", reason="the L2 prefetch is inline PTX: GPU only")
@pytest.mark.parametrize("mode", ["plain", "glu", "norm"])
def test_into_prefetch_switch_same_sums(monkeypatch, mode):
    """gemv.W_PREFETCH (the first rows of W^T asked of L2 before the PDL wait) moves bytes into
    L2, never values: the same output with it on and off (to the atomic adds' rounding), and only
    where it applies (accumulating launches of W_PREFETCH_KINDS, whole 16-byte rows)."""
    from teal_nb.kernels import gemv

    K, N, dtype = 200, 128, torch.bfloat16
    wt, x, kw, thr = _switch_case(mode, dtype, K, N)
    cfg = gemv.Config(*CFGS[2])
    kind = gemv._input_kind(mode == "glu", mode == "norm", (0, 1))
    rows = gemv._prefetch(wt, cfg, kind, accum=True)["PF_ROWS"]
    assert rows == (0 if kind not in gemv.W_PREFETCH_KINDS or torch.cuda.get_device_capability()[0] < 9
                    else gemv.W_PREFETCH_ROWS)
    assert gemv._prefetch(wt, cfg, kind, accum=False)["PF_ROWS"] == 0
    outs = []
    for on in (True, False):
        monkeypatch.setattr(gemv, "W_PREFETCH", on)
        out = torch.zeros(N, device=DEV)
        _launch(x, wt, thr, (N,), None, cfg, out=out, **kw)
        outs.append(out)
    _same_sums(outs[0], outs[1])
    ref = torch.zeros(N, device=DEV)
    sparse_gemv_into_reference(ref, x, wt, thr, None, **kw)
    assert rel_err(outs[0], ref) < TOL[dtype]


@needs_kernel
def test_stamp_hook_asked_once_per_compacting_launch(monkeypatch):
    """gemv.STAMP_HOOK (kernels/decode_timeline.py) is asked for a table by each compacting
    launch, with its program count and input kind; a hook that answers None changes nothing."""
    from teal_nb.kernels import gemv

    K, N, dtype = 70, 100, torch.bfloat16
    wt, x, kw, thr = _switch_case("glu", dtype, K, N)
    asked = []
    monkeypatch.setattr(gemv, "STAMP_HOOK", lambda programs, info: asked.append((programs, info)))
    outs = []
    for cfg in (CFGS[2], CFGS[7], CFGS[0]):  # compacting; compacting, 3 programs per slice; masked
        out = torch.zeros(N, device=DEV)
        _launch(x, wt, thr, (N,), None, cfg, out=out, **kw)
        outs.append(out)
    grid = lambda c, share: -(-N // c[0]) * -(-K // c[5]) * share  # noqa: E731
    assert asked == [(grid(CFGS[2], 1), dict(N=N, K=K, kind="glu")), (grid(CFGS[7], 3), dict(N=N, K=K, kind="glu"))]
    ref = torch.zeros(N, device=DEV)
    sparse_gemv_into_reference(ref, x, wt, thr, None, **kw)
    assert all(rel_err(o, ref) < TOL[dtype] for o in outs)


def test_decode_timeline_tables_and_summaries():
    """kernels/decode_timeline.py: the stamp tables are consecutive rows of one table (too few
    rows: a clear error); a launch's summary and the per-projection medians over layers, against
    hand-made timers (ns)."""
    mod = _lab_module("decode_timeline")
    tables = mod.StampTables(10, "cpu")
    assert tables(4, {"kind": "norm"}).shape == (4, 12) and tables(6, {"kind": "partials"}).data_ptr() == \
        tables.table[4:].data_ptr()
    with pytest.raises(RuntimeError, match="larger --capacity"):
        tables(1, {})

    base = 10**9  # the GPU's timer (ns) is never 0: 0 marks a slot not reached

    def launch(entry, waited, listed, streamed, ended):  # two programs; the second 1 us later at each point
        st = torch.zeros(2, 12, dtype=torch.int64)
        for j, t in enumerate((entry, waited, listed, streamed, ended)):
            st[:, 2 * j] = torch.tensor([t * 1000, t * 1000 + 1000], dtype=torch.float64) + base
            # each SM's cycle counter (1980 per us) from its own origin
            st[:, 2 * j + 1] = torch.tensor([7 * 10**9, 9 * 10**9]) + 1980 * st[:, 2 * j].sub(base) // 1000
        return st

    cycles = [3960.0, 1980.0, 13860.0, 1980.0]  # 2, 1, 7 and 1 us from each slot to the next
    s = mod.summarize_launch(launch(0, 2, 3, 10, 11), t0=base + 2000)
    assert s == dict(entry_first=-2.0, entry_med=-1.5, waited_first=0.0, waited_last=1.0, listed_med=1.5,
                     streamed_med=8.5, ended_med=9.5, ended_last=10.0, cycles_med=cycles)
    # A slot a program did not reach (0: an attention split past the position) is left out.
    st = torch.cat([launch(0, 2, 3, 10, 11), launch(0, 2, 3, 10, 11)[:1]])
    st[2, 4:8] = 0
    st[2, 9] += 10**6  # its end's cycles counted from its wait's would be far off; from slot 3's, it has none
    # (Its early end is not in the median end either: 9.5, the two programs that streamed.)
    st[2, 8] -= 5000
    assert mod.summarize_launch(st, t0=base + 2000) == dict(entry_first=-2.0, entry_med=-2.0, waited_first=0.0,
                                                            waited_last=1.0, listed_med=1.5, streamed_med=8.5,
                                                            ended_med=9.5, ended_last=10.0, cycles_med=cycles)
    # Two layers of four launches, each launch entering 3 us before the last one ends and waiting 1 us past it.
    launches, t = [], 0
    for i in range(8):
        launches.append(mod.summarize_launch(launch(t - 3, t + 1, t + 2, t + 2 + i % 4 + 1, t + 4 + i % 4), t0=base))
        t = launches[-1]["ended_last"]
    bp = mod.by_projection(launches)
    for i, p in enumerate(mod.PROJECTIONS):
        assert bp[p]["chain"] == 1.5 and bp[p]["stream"] == i + 1 and bp[p]["tail"] == 0.5
        assert bp[p]["gap"] == 1.0 and bp[p]["entry_early"] == 2.5  # the first launch has none: from the second layer
        assert bp[p]["first_early"] == 3.0
        assert bp[p]["cycles"] == [7920.0, 1980.0, 1980.0 * (i + 1), 1980.0]  # 4, 1, i + 1 and 1 us
    assert bp["layer"] == (launches[-1]["ended_last"] - launches[0]["waited_first"]) / 2
    with pytest.raises(ValueError, match="whole number of layers"):
        mod.by_projection(launches[:5])
    # With the attention kernel stamped too: five launches per layer, named in that order.
    bp5 = mod.by_projection(launches[:5] + launches[:5], mod.WITH_ATTENTION)
    assert list(bp5)[:5] == list(mod.WITH_ATTENTION) and bp5["attention"]["stream"] == 2
    with pytest.raises(ValueError, match="layers of 5"):
        mod.by_projection(launches, mod.WITH_ATTENTION)


def test_decode_variant_switches():
    """kernels/decode_profile.py's set_gemv_switches (decode_timeline.py's too): each switch from
    the defaults it is given unless the variant's options say otherwise, so that one variant's
    options do not leak into the next."""
    from types import SimpleNamespace

    mod = _lab_module("decode_profile")
    defaults = dict(NORM_PRELOAD=True, W_PREFETCH=True, W_PREFETCH_ROWS=16, W_PREFETCH_KINDS={"glu"})
    g = SimpleNamespace()
    mod.set_gemv_switches(g, ["fused", "nopreload", "noprefetch", "pf8", "pf=norm+plain"], defaults)
    assert vars(g) == dict(NORM_PRELOAD=False, W_PREFETCH=False, W_PREFETCH_ROWS=8, W_PREFETCH_KINDS={"norm", "plain"})
    mod.set_gemv_switches(g, ["fused"], defaults)
    assert vars(g) == defaults
    # Launch configs per variant (tuning.ACCUM): one shape's replaced, the rest as they were, and
    # back to the defaults for the next variant.
    table = {(28672, 4096): (1024, 8, 4), (4096, 4096): (512, 8, 2)}
    t = SimpleNamespace(ACCUM=dict(table))
    mod.set_accum_configs(t, ["fused", "cfg=28672x4096=1024/8/4/0/0/592/2/1/0/0/0/1/2"], dict(table))
    assert t.ACCUM == {(28672, 4096): (1024, 8, 4, 0, 0, 592, 2, 1, 0, 0, 0, 1, 2), (4096, 4096): (512, 8, 2)}
    mod.set_accum_configs(t, ["fused"], dict(table))
    assert t.ACCUM == table
    for bad, match in (("cfg=28672x4096=1024,8", "f1/f2"), ("cfg=1x2=1/2", "not a shape")):
        with pytest.raises(ValueError, match=match):
            mod.set_accum_configs(t, [bad], dict(table))
    # A variant run twice in one process (an A/B's baseline before and after) keeps both runs.
    seen = {"triton50:fused": 1, "triton50:fused (2)": 2}
    assert mod.repeat_name(seen, "triton50:fused") == "triton50:fused (3)"
    assert mod.repeat_name(seen, "triton0:fused") == "triton0:fused"
    # The attention's switches (decode_attention), each back to its default for the next variant.
    da = SimpleNamespace(CONFIGS={(128, 256): (32, 4, 1), (64, 99): (16, 4, 1)})
    mod.set_attention_switches(da, ["fused", "attn=16x2", "nopdl", "kvall", "nopartials", "stampkv"], 128, 256, 16)
    assert da.CONFIGS == {(128, 256): (16, 2, 1), (64, 99): (16, 4, 1)}
    assert (da.PDL, da.KV_UP_TO_POS, da.MAX_PARTIAL_SPLITS, da.STAMP_KV) == (False, False, 0, True)
    mod.set_attention_switches(da, ["fused"], 128, 256, 16)
    assert da.CONFIGS == {(64, 99): (16, 4, 1)}
    assert (da.PDL, da.KV_UP_TO_POS, da.MAX_PARTIAL_SPLITS, da.STAMP_KV) == (True, True, 16, False)
