"""The static-cache decoder against the HF model: dense, sparse (torch and Triton backends), greedy."""
import json

import pytest
import torch

from teal_nb.config import SITES, get_preset
from teal_nb.decode import Decoder, amdahl_ceiling, weight_bytes_per_token, DecoderConfig
from teal_nb.decode_calibrate import (calibrate_decode, measure_realized, nonuniform_allocation,
                                      param_weighted_mean)

PROMPT = "The capital of France is"


def _cpu_kernels() -> bool:
    from teal_nb.decode_attention import usable

    return usable(torch.device("cpu"))


# The fused step on a CPU decoder runs the Triton kernels in the interpreter, which conftest.py
# turns on only where there is no GPU (on a GPU machine the same kernels run in test_kernels.py,
# test_attention_partials and the decode bench's checks).
needs_cpu_kernels = pytest.mark.skipif(not _cpu_kernels(), reason="needs Triton's CPU interpreter")


@pytest.fixture(scope="module")
def dec(smollm):
    model, _ = smollm
    return Decoder.from_hf(model, max_seq_len=64)


@pytest.fixture(scope="module")
def ids(smollm):
    return smollm[1](PROMPT, return_tensors="pt").input_ids


def _tiny(dtype="float32", bias=True, n_layers=2):
    # Odd-ish sizes, GQA, Qwen2-style q/k/v bias.
    p = get_preset("qwen2.5-7b" if bias else "llama-3-8b").with_(
        n_layers=n_layers, hidden=96, intermediate=160, n_heads=6, n_kv_heads=2, vocab=300)
    d = Decoder.random(p, dtype, "cpu", max_seq_len=48, std=0.1, seed=1)
    if bias:
        with torch.no_grad():
            for blk in d.layers:
                blk.qkv_bias.normal_()
    return d


def _hf_steps(model, ids, tokens):
    """HF logits for each decode step: prompt forward, then one token at a time with the cache."""
    out = model(ids, use_cache=True)
    cache, logits = out.past_key_values, [out.logits[0, -1]]
    for t in tokens[:-1]:
        out = model(t.view(1, 1), past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits.append(out.logits[0, -1])
    return torch.stack(logits)


def _dec_steps(dec, ids, tokens):
    t = ids.shape[1]
    logits = [dec(ids, torch.arange(t))[0]]
    for i, tok in enumerate(tokens[:-1]):
        logits.append(dec(tok.view(1, 1), torch.tensor([t + i]))[0])
    return torch.stack(logits)


@torch.no_grad()
def test_dense_logits_match_hf(smollm, dec, ids):
    model, _ = smollm
    dec.set_sparsity(None, backend="dense", prefill="none")
    ref = model(ids).logits[0]
    got = dec(ids, torch.arange(ids.shape[1]), all_logits=True)[0]
    assert (got - ref).abs().max() <= 1e-3 * ref.abs().max()
    tokens = torch.tensor([264, 3575, 28, 1345])
    ref = _hf_steps(model, ids, tokens)
    got = _dec_steps(dec, ids, tokens)
    assert (got - ref).abs().max() <= 1e-3 * ref.abs().max()


@torch.no_grad()
def test_greedy_matches_hf(smollm, dec, ids):
    model, tok = smollm
    dec.set_sparsity(None, backend="dense", prefill="none")
    out, timing = dec.generate(ids, 10)
    ref = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(out, ref)
    assert " Paris" in tok.decode(out[0])
    assert timing["new_tokens"] == 10 and timing["decode_tok_s"] > 0


@pytest.fixture(scope="module")
def thresholds(dec, ids):
    return calibrate_decode(dec, ids, 6, 0.5, iters=1)


@torch.no_grad()
def test_torch_sparse_matches_hf_sparsify(smollm, dec, ids, thresholds):
    from teal_nb.sparsify import sparsify

    model, _ = smollm
    dec.set_sparsity(thresholds, backend="torch", prefill="none")
    realized, out = measure_realized(dec, ids, 6)
    tokens = out[0, ids.shape[1]:]
    got = _dec_steps(dec, ids, tokens)
    with sparsify(model, thresholds, prefill="none") as sp:
        ref = _hf_steps(model, ids, tokens)
        hf_realized = sp.realized()
        hf_out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert (got - ref).abs().max() <= 1e-3 * ref.abs().max()
    assert torch.equal(out, hf_out)  # sparse greedy generation: the same tokens
    # measure_realized counted the 5 sparse decode steps; HF counted those plus _hf_steps' 5 (the same
    # tokens) and generate's 5: the same fractions.
    assert torch.allclose(realized, hf_realized, atol=1e-6)
    assert 0.3 < realized.mean() < 0.6


@torch.no_grad()
@pytest.mark.parametrize("prefill", ["last_half", "all"])
def test_sparse_prefill_protocols_match_hf(smollm, dec, ids, thresholds, prefill):
    from teal_nb.sparsify import sparsify

    model, _ = smollm
    dec.set_sparsity(thresholds, backend="torch", prefill=prefill)
    got = dec(ids, torch.arange(ids.shape[1]), all_logits=True)[0]
    with sparsify(model, thresholds, prefill=prefill):
        ref = model(ids).logits[0]
    dense = model(ids).logits[0]
    assert (got - ref).abs().max() <= 1e-3 * ref.abs().max()
    assert (got - dense).abs().max() > 1e-2  # the protocol did sparsify something
    dec.set_sparsity(None, backend="dense", prefill="none")


@torch.no_grad()
def test_triton_backend_matches_torch():
    """fp32, end to end: the Triton backend (interpreted on CPU) gives the torch backend's logits."""
    d = _tiny("float32")
    ids = torch.randint(0, 300, (1, 4), generator=torch.Generator().manual_seed(0))
    alloc = nonuniform_allocation(d.cfg, 0.5)  # different thresholds for q, k, v and for gate, up
    th = calibrate_decode(d, ids, 6, alloc, iters=1)
    d.set_sparsity(th, backend="torch")
    r_torch, out = measure_realized(d, ids, 6)
    tokens = out[0, 4:]
    ref = _dec_steps(d, ids, tokens)
    d.set_sparsity(th, backend="triton")
    r_triton, _ = measure_realized(d, ids, 6)
    got = _dec_steps(d, ids, tokens)
    assert ((got - ref).norm() / ref.norm()) < 1e-4
    assert torch.allclose(r_torch, r_triton)


@torch.no_grad()
def test_dense_through_the_kernel_matches_cublas_path():
    """Dense decoding with o, down and the fused qkv through our kernel keeping every channel
    (down fed the gate/up output: SiLU x up inside the kernel) gives the same logits as the
    F.linear path, prompt and decode steps (fp32; prefill rows stay on F.linear)."""
    d = _tiny("float32")
    ids = torch.randint(0, 300, (1, 4), generator=torch.Generator().manual_seed(4))
    d.set_sparsity(None, backend="dense", prefill="none")
    tokens = d.generate(ids, 5)[0][0, 4:]
    ref = _dec_steps(d, ids, tokens)
    d.prepare_triton()
    d.dense_triton = {"qkv", "o", "down"}
    got = _dec_steps(d, ids, tokens)
    d.drop_triton()
    assert not d.dense_triton and ((got - ref).norm() / ref.norm()) < 1e-5


@needs_cpu_kernels
@torch.no_grad()
@pytest.mark.parametrize("partials", [True, False], ids=["partials", "attention_output"])
def test_fused_step_matches_unfused(partials, monkeypatch):
    """The fused step (fp32 residual stream, RMSNorm inside qkv's and gate/up's kernels, o and
    down adding into the stream, gate/up buffers cleared by the next launch; o's kernel combining
    the attention's split partials, or reading the attention output when the cache needs too many
    splits) gives the unfused Triton step's logits and tokens (fp32: up to summation order),
    sparse and dense through the kernel, prompt and decode steps."""
    from teal_nb import decode_attention as da

    if not partials:
        monkeypatch.setattr(da, "MAX_PARTIAL_SPLITS", 0)
    d = _tiny("float32")
    assert (da.partials_config(d.cfg.head_dim, d.max_seq_len) is not None) == partials
    d.attention = "fused"  # the fused step needs the fused attention kernel (interpreted on CPU)
    ids = torch.randint(0, 300, (1, 4), generator=torch.Generator().manual_seed(5))
    th = torch.rand(d.cfg.n_layers, len(SITES)) * 0.3
    for backend in ("triton", "dense"):
        d.set_sparsity(th if backend == "triton" else None, backend=backend)
        d.prepare_triton()
        if backend == "dense":
            d.dense_triton = {"qkv", "o", "gate_up", "down"}
        d.fused_step = False
        out, _ = d.generate(ids, 6)
        tokens = out[0, 4:]
        ref = _dec_steps(d, ids, tokens)
        d.fused_step = True
        assert d.uses_fused_step(tokens[:1].view(1, 1))
        got = _dec_steps(d, ids, tokens)
        out2, _ = d.generate(ids, 6)
        assert ((got - ref).norm() / ref.norm()) < 1e-4, backend
        assert torch.equal(out, out2)
    # Realized sparsity counted on the fused step (its inputs computed beside) = on the unfused.
    d.dense_triton = set()
    d.set_sparsity(th, backend="triton")
    d.fused_step = False
    r_unfused, _ = measure_realized(d, ids, 6)
    d.fused_step = True
    r_fused, _ = measure_realized(d, ids, 6)
    assert torch.allclose(r_unfused, r_fused) and r_fused.min() > 0
    d.set_sparsity(None, backend="dense")
    assert not d.uses_fused_step(tokens[:1].view(1, 1))  # cuBLAS projections: the unfused step
    d.attention = "auto"


@needs_cpu_kernels
@torch.no_grad()
def test_fused_step_bf16_is_closer_to_fp32():
    """In bf16 the fused step rounds less (its residual stream stays fp32): its logits are at
    least as close to the same model computed in fp32 as the unfused step's, and both within
    bf16's rounding of each other (dense through the kernel: a sparse comparison would mostly
    count entries that rounding moves across a threshold)."""
    d, d32 = _tiny("bfloat16"), _tiny("float32")
    for p, p32 in zip(d.parameters(), d32.parameters()):
        p32.copy_(p.float())
    d.attention = "fused"
    d.set_sparsity(None, backend="dense")
    d.prepare_triton()
    d.dense_triton = {"qkv", "o", "gate_up", "down"}
    ids = torch.randint(0, 300, (1, 4), generator=torch.Generator().manual_seed(5))
    d.fused_step = False
    tokens = d.generate(ids, 8)[0][0, 4:]
    unfused = _dec_steps(d, ids, tokens).float()
    d.fused_step = True
    fused = _dec_steps(d, ids, tokens).float()
    truth = _dec_steps(d32, ids, tokens)
    err = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert err(fused, truth) <= err(unfused, truth) < 2e-2
    assert err(fused, unfused) < 2e-2


@needs_cpu_kernels
@torch.no_grad()
def test_fused_step_traces_whole():
    """torch.compile captures the fused step as one graph (fullgraph; aot_eager here: the mutating
    custom ops are functionalized and the order of clears and reads kept) and gives the eager
    step's tokens."""
    d = _tiny("float32")
    d.attention = "fused"
    th = torch.rand(d.cfg.n_layers, len(SITES)) * 0.3
    d.set_sparsity(th, backend="triton")
    ids = torch.randint(0, 300, (1, 4), generator=torch.Generator().manual_seed(6))
    out, _ = d.generate(ids, 6)
    torch._dynamo.reset()
    d.compile(None)
    d._compiled = torch.compile(d._step, backend="aot_eager", fullgraph=True)
    out2, _ = d.generate(ids, 6)
    d._compiled = None
    d.attention = "auto"
    assert torch.equal(out, out2)


@torch.no_grad()
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_triton_projections_match_torch(dtype):
    """Half precision, per projection on the same input (end to end, an entry that rounding moves
    across its threshold changes the whole trajectory, so compare where the inputs are equal)."""
    d = _tiny(dtype)
    th = torch.rand(d.cfg.n_layers, len(SITES)) * 0.8
    d.set_sparsity(th, backend="triton")
    for li in range(d.cfg.n_layers):
        for proj in ("qkv", "o", "gate_up", "down"):
            k = d.cfg.proj_shape(proj)[1]
            x = torch.randn(1, 1, k).to(d.dtype)
            d.backend = "triton"
            got = d._linear(x, li, proj, slice(None)).float()
            d.backend = "torch"
            ref = d._linear(x, li, proj, slice(None)).float()
            assert ((got - ref).norm() / ref.norm()) < 1e-2, (li, proj)
        # down fed with the gate/up output: the kernel computes silu(gate) * up itself
        gu = (2 * torch.randn(1, 1, 2 * d.cfg.intermediate)).to(d.dtype)
        d.backend = "triton"
        got = d._linear(gu, li, "down", slice(None), glu=True).float()
        d.backend = "torch"
        ref = d._linear(gu, li, "down", slice(None), glu=True).float()
        assert ((got - ref).norm() / ref.norm()) < 1e-2, (li, "down, glu")


@torch.no_grad()
def test_calibration_hits_target_per_site():
    p = get_preset("llama-3-8b").with_(n_layers=2, hidden=256, intermediate=512, n_heads=8, n_kv_heads=2, vocab=512)
    d = Decoder.random(p, "float32", "cpu", max_seq_len=32, seed=1)
    ids = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(2))
    forced, _ = d.generate(ids, 24)  # every pass decodes this sequence (teacher forcing)
    for target in (0.5, nonuniform_allocation(d.cfg, 0.4)):
        alloc = torch.as_tensor(target).expand(2, len(SITES))
        th = calibrate_decode(d, ids, 24, alloc, iters=4, tol=0.01, forced=forced)
        d.set_sparsity(th, backend="torch")
        realized, _ = measure_realized(d, ids, 24, forced=forced)
        assert (realized - alloc).abs().max() < 0.02, realized - alloc


def test_nonuniform_allocation_averages_to_target():
    cfg = DecoderConfig.from_preset("llama-3-8b")
    a = nonuniform_allocation(cfg, 0.5)
    assert a.shape == (32, 7)
    assert abs(param_weighted_mean(cfg, a) - 0.5) < 1e-4
    assert a.std() > 0.03 and a.min() >= 0 and a.max() < 1


def test_bytes_and_ceiling_llama3():
    cfg = DecoderConfig.from_preset("llama-3-8b")
    b = weight_bytes_per_token(cfg, "bfloat16")
    assert abs(b["total"] / 1e9 - 15.01) < 0.05  # the anchors' ~15.0 GB per token
    assert abs(amdahl_ceiling(cfg, "bfloat16", 0.5) - 1.87) < 0.01
    assert abs(amdahl_ceiling(cfg, "bfloat16", 0.4) - 1.59) < 0.01


def test_bench_decode_smoke(tmp_path):
    from teal_nb.decode_bench import format_table, run_bench

    out = tmp_path / "decode.json"
    res = run_bench("llama-3-8b", ("float32",), (0.5,), (0.5,), runs=1, warmup=0, new_tokens=6, prompt_len=3,
                    backend="torch", device="cpu", compile_mode=None, n_layers=1, calib_iters=1, out=out,
                    log=lambda *a: None, preset_overrides=dict(hidden=64, intermediate=128, n_heads=4,
                                                               n_kv_heads=2, vocab=128))
    saved = json.loads(out.read_text())
    assert saved["provenance"]["git_sha"]
    kinds = [(r["backend"], r["allocation"], r["sparsity"]) for r in saved["records"]]
    assert kinds == [("dense", "dense", 0.0), ("torch", "uniform", 0.5), ("torch", "nonuniform", 0.5),
                     ("torch", "uniform", 0.0)]
    for r in saved["records"]:
        assert {"model", "dtype", "sparsity", "tok_s", "weight_GBps"} <= set(r)
    assert set(saved["records"][1]["realized_sparsity"]) == set(SITES)
    assert "float32" in res["summary"]
    assert "tok/s" in format_table(res["records"])


def test_generate_cli(capsys):
    from teal_nb.cli import main

    assert main(["generate", "--sparsity", "0.4", "--calibration", "decode", "--max-new-tokens", "3",
                 PROMPT]) == 0
    out = capsys.readouterr().out
    assert out.startswith(PROMPT) and "tok/s" in out and "realized sparsity" in out


# The attention kernel's own tests run where it does: compiled (with PDL) on a GPU, else in the
# CPU interpreter.
ATTN_DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _attention_cases(dt, tol, cases):
    """decode_attention against its torch reference at (query heads, kv heads, head dim, cache
    length, position): the output, and the cache written at the position only (to within one
    rounding of the reference)."""
    import math

    from teal_nb.decode_attention import decode_attention, decode_attention_reference

    for h, hkv, d, s, p in cases:
        qkv = torch.randn(1, 1, (h + 2 * hkv) * d).to(dt)
        cos, sin = torch.randn(s, d).to(dt), torch.randn(s, d).to(dt)
        kc, vc = torch.randn(1, hkv, s, d).to(dt), torch.randn(1, hkv, s, d).to(dt)
        qkv, cos, sin, kc, vc = (t.to(ATTN_DEV) for t in (qkv, cos, sin, kc, vc))
        kr, vr, pos = kc.clone(), vc.clone(), torch.tensor([p], device=ATTN_DEV)
        for _ in range(2):  # twice: the split kernel must leave its counters reset
            y = decode_attention(qkv, cos, sin, pos, kc, vc, h, 1 / math.sqrt(d))
        ref = decode_attention_reference(qkv, cos, sin, pos, kr, vr, h, 1 / math.sqrt(d))
        assert ((y.float() - ref.float()).norm() / ref.float().norm()) < tol, (dt, h, d, s, p)
        assert torch.equal(vc, vr)
        assert torch.equal(kc[:, :, :p], kr[:, :, :p]) and torch.equal(kc[:, :, p + 1:], kr[:, :, p + 1:])
        assert torch.allclose(kc[:, :, p].float(), kr[:, :, p].float(), rtol=1e-2, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("up_to_pos", [True, False])
def test_fused_attention_launch_configs(up_to_pos, monkeypatch):
    """Every launch config the bench may choose (blocks, warps, the split kernel) computes the
    reference's function, at positions in the first block, at a block edge and in the last one;
    the split kernel whether it requests the cached rows below the position only or whole blocks
    (KV_UP_TO_POS)."""
    from teal_nb import decode_attention as da

    if not da.usable(ATTN_DEV):
        pytest.skip("needs a GPU or Triton's CPU interpreter")
    monkeypatch.setattr(da, "KV_UP_TO_POS", up_to_pos)
    cases = [(4, 2, 32, 100, 0), (4, 2, 32, 100, 64), (4, 2, 32, 100, 99)]
    try:
        for cfg in da.CANDIDATES if up_to_pos else [c for c in da.CANDIDATES if c[2:] == (1,)]:
            da.CONFIGS[(32, 100)] = cfg
            _attention_cases(torch.float32, 1e-5, cases)
    finally:
        da.CONFIGS.pop((32, 100), None)


@torch.no_grad()
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_attention_matches_torch(dtype):
    """The one-launch attention step (RoPE, cache write, GQA attention; compiled on a GPU,
    interpreted on CPU) against the kernel's torch reference at several positions, and (in the
    CPU interpreter, where the tiny decoder runs) end to end against the decoder's torch attention
    path (fp32: same logits, same greedy tokens)."""
    from teal_nb.decode_attention import usable

    if not usable(ATTN_DEV):
        pytest.skip("needs a GPU or Triton's CPU interpreter")
    # Inside the first block of the cache, at its edge, and past it (the loop over further blocks).
    _attention_cases(getattr(torch, dtype), 1e-5 if dtype == "float32" else 2e-2,
                     [(6, 2, 32, 40, 0), (6, 2, 32, 40, 1), (6, 2, 32, 40, 23), (6, 2, 32, 40, 39),
                      (4, 1, 128, 300, 127), (4, 1, 128, 300, 128), (4, 1, 128, 300, 299)])
    if dtype != "float32" or not usable(torch.device("cpu")):
        return
    dec = _tiny("float32")
    ids = torch.randint(0, 300, (1, 4), generator=torch.Generator().manual_seed(3))
    dec.attention = "torch"
    out, _ = dec.generate(ids, 8)
    ref = _dec_steps(dec, ids, out[0, 4:])
    dec.attention = "fused"
    out2, _ = dec.generate(ids, 8)
    got = _dec_steps(dec, ids, out[0, 4:])
    dec.attention = "auto"
    assert torch.equal(out, out2)
    assert ((got - ref).norm() / ref.norm()) < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("dtype,up_to_pos", [("float32", True), ("bfloat16", True), ("float32", False)])
def test_attention_partials(dtype, up_to_pos, monkeypatch):
    """decode_attention_partials (the split kernel without its combining step; interpreted on CPU)
    leaves the partials of its torch reference, empty splits included, and writes the caches as
    decode_attention does; combined (attention_input, the o kernel's input stage) they are the
    attention output of decode_attention_reference. The cached rows at and past the position are
    random, so a kernel that read one of them (KV_UP_TO_POS: none requested) would differ."""
    import math

    from teal_nb import decode_attention as da
    from teal_nb.decode_attention import (decode_attention_partials, decode_attention_partials_reference,
                                          decode_attention_reference, usable)
    from teal_nb.kernels import attention_input

    monkeypatch.setattr(da, "KV_UP_TO_POS", up_to_pos)

    dev = ATTN_DEV
    if not usable(dev):
        pytest.skip("needs a GPU or Triton's CPU interpreter")
    dt = getattr(torch, dtype)
    # (query heads, kv heads, head dim, cache length, split rows, position): the first split
    # only, a split edge, the last split; splits past the position are empty.
    for h, hkv, d, s, bs, p in [(6, 2, 32, 40, 16, 0), (6, 2, 32, 40, 16, 16), (4, 1, 64, 100, 32, 99),
                                (4, 2, 32, 64, 16, 37)]:
        g = torch.Generator().manual_seed(p)
        qkv = torch.randn(1, 1, (h + 2 * hkv) * d, generator=g).to(dt)
        cos, sin = torch.randn(s, d, generator=g).to(dt), torch.randn(s, d, generator=g).to(dt)
        kc, vc = torch.randn(1, hkv, s, d, generator=g).to(dt), torch.randn(1, hkv, s, d, generator=g).to(dt)
        kr, vr, ka, va = kc.clone(), vc.clone(), kc.clone(), vc.clone()
        qkv, cos, sin, kc, vc, kr, vr, ka, va = (t.to(dev) for t in (qkv, cos, sin, kc, vc, kr, vr, ka, va))
        pos, scale = torch.tensor([p], device=dev), 1 / math.sqrt(d)
        part = decode_attention_partials(qkv, cos, sin, pos, kc, vc, h, scale, bs, 4)
        ref = decode_attention_partials_reference(qkv, cos, sin, pos, kr, vr, h, scale, bs)
        assert part.shape == ref.shape == (h, -(-s // bs), d + 2)
        empty = torch.isinf(ref[:, :, d])
        assert torch.equal(torch.isinf(part[:, :, d]), empty)
        assert int(empty.sum()) == h * (ref.shape[1] - max(1, -(-p // bs)))  # splits past the position
        assert torch.equal(part[empty], ref[empty])
        # (bf16: the interpreter rounds q to bf16 by truncation, torch to nearest.)
        tol = 1e-5 if dtype == "float32" else 2e-2
        assert ((part[~empty] - ref[~empty]).norm() / ref[~empty].norm()) < tol
        y = decode_attention_reference(qkv, cos, sin, pos, ka, va, h, scale)
        for c in (kc, kr):
            assert torch.equal(c[:, :, :p], ka[:, :, :p]) and torch.equal(c[:, :, p + 1:], ka[:, :, p + 1:])
            assert torch.allclose(c[:, :, p].float(), ka[:, :, p].float(), rtol=1e-2, atol=1e-6)
        assert torch.equal(vc, va) and torch.equal(vr, va)
        for pt in (part, ref):
            got = attention_input(pt, dt).view(y.shape)
            assert ((got.float() - y.float()).norm() / y.float().norm()) < tol, (dtype, p)
    with pytest.raises(ValueError, match="batch 1"):
        decode_attention_partials(qkv, cos, sin, pos, kc.expand(2, -1, -1, -1), vc.expand(2, -1, -1, -1), h,
                                  scale, bs, 4)


def test_attention_stamp_hook_asked_once_per_launch(monkeypatch):
    """decode_attention.STAMP_HOOK (kernels/decode_timeline.py) is asked for a table by each
    launch of the split kernel, with its program count; a hook that answers None changes nothing,
    and a table too small for the launch is refused."""
    import math

    from teal_nb import decode_attention as da

    dev = ATTN_DEV
    if not da.usable(dev):
        pytest.skip("needs a GPU or Triton's CPU interpreter")
    h, hkv, d, s, bs, p = 4, 2, 32, 64, 16, 37
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(1, 1, (h + 2 * hkv) * d, generator=g).to(dev)
    cos, sin = torch.randn(s, d, generator=g).to(dev), torch.randn(s, d, generator=g).to(dev)
    kc, vc = torch.randn(1, hkv, s, d, generator=g).to(dev), torch.randn(1, hkv, s, d, generator=g).to(dev)
    pos, scale = torch.tensor([p], device=dev), 1 / math.sqrt(d)
    plain = da.decode_attention_partials(qkv, cos, sin, pos, kc, vc, h, scale, bs, 4)
    asked = []
    monkeypatch.setattr(da, "STAMP_HOOK", lambda programs, info: asked.append((programs, info)))
    hooked = da.decode_attention_partials(qkv, cos, sin, pos, kc, vc, h, scale, bs, 4)
    assert asked == [(h * (s // bs), {"kind": "attention"})] and torch.equal(hooked, plain)
    monkeypatch.setattr(da, "STAMP_HOOK", lambda programs, info: torch.zeros(programs - 1, 12, dtype=torch.int64))
    with pytest.raises(ValueError, match="12 int64 each"):
        da.decode_attention_partials(qkv, cos, sin, pos, kc, vc, h, scale, bs, 4)


def test_two_stage_greedy_is_argmax():
    """The step's argmax in two reductions picks the first maximum, as torch.argmax does."""
    p = get_preset("llama-3-8b").with_(n_layers=1, hidden=64, intermediate=128, n_heads=4, n_kv_heads=2,
                                       vocab=128256)
    d = Decoder.random(p, "float32", "cpu", max_seq_len=16)
    assert d.argmax_chunk and 128256 % d.argmax_chunk == 0
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # many ties: small integers
        logits = torch.randint(0, 4, (2, 128256), generator=g).float()
        assert torch.equal(d.greedy(logits), torch.argmax(logits, dim=-1, keepdim=True))
    logits = torch.randn(3, 128256, generator=g)
    assert torch.equal(d.greedy(logits), torch.argmax(logits, dim=-1, keepdim=True))
