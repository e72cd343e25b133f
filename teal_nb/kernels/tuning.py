"""Launch configurations of the sparse GEMV kernel, keyed by (N, K), chosen by measurement.

A config is a `gemv.Config` (BLOCK_N, BLOCK_K, num_warps, PROGS_PER_SM, REDUCE, SLICE[, DEPTH,
PDL, SCAN, PRODUCER, MAXNREG, SUM_ROWS, SHARE]); SLICE = 0 selects the masked kernel, SLICE > 0 the
compacting one, each program owning SLICE input channels. Three tables, all measured on one
NVIDIA H200 with `kernels/tune_gemv.py` (for each shape the config with the lowest weighted sum
over sparsities 0, 0.5 (weight 2) and 0.8 (weight 0.5) of time / best time): TABLE for
`sparse_gemv` in bf16 (sweep 9, kernels/results/h200/gemv_tune.json), FP16 for it in fp16
(sweep 8), ACCUM for `sparse_gemv_into` in both dtypes (sweeps 10, 13, 14, 16 and 18:
gemv_tune_v10_accum.json, gemv_tune_v13_bf16_accum.json, gemv_tune_v14_share.json,
gemv_tune_v16.json, gemv_tune_v18.json).
The embedded model's configs come from an earlier sweep (gemv_tune_v3.json).
kernels/results/h200/gemv.json was measured with exactly these tables. Shapes not in them get
`default_config`, a size rule read off the same sweeps.
"""
from __future__ import annotations

TABLE: dict[tuple[int, ...], tuple[int, ...]] = {
    # Wide output blocks (512-1024 columns: 1-2 KB of each kept row per program) and short K
    # slices, sized so that the grid fills the 132 SMs about evenly (kernels/README.md).
    # Sweep 9 (bf16): 8-row tiles whose rows are summed as they arrive (SUM_ROWS, see
    # gemv._rows_per_thread) fit 4 programs per SM, so short K slices and many programs win.
    # PDL (last field) since sweep 8: each launch is scheduled while the one before finishes
    # (Hopper and newer; elsewhere the flag is ignored).
    (6144, 4096): (1024, 8, 4, 0, 0, 96, 1, 1),  # qkv_fused: 6 x 43 programs
    (4096, 4096): (512, 8, 2, 0, 0, 64, 1, 1),  # q|o: 8 x 64
    (1024, 4096): (128, 32, 4, 0, 0, 128, 1, 1),  # k|v: 8 x 32
    (28672, 4096): (1024, 8, 4, 0, 0, 296, 2, 1),  # gate_up_fused: 28 x 14, 2 tiles in flight
    (14336, 4096): (512, 16, 4, 0, 0, 456, 1, 1),  # gate|up: 28 x 9
    (4096, 14336): (1024, 8, 4, 0, 0, 112, 1, 1),  # down: 4 x 128
    (960, 576): (64, 32, 4, 8, 0, 0),  # smol_qkv_fused
    (576, 576): (64, 32, 4, 2, 0, 0),  # smol_q|o
    (192, 576): (64, 32, 4, 4, 0, 0),  # smol_k|v
    (3072, 576): (64, 64, 4, 2, 0, 0),  # smol_gate_up_fused
    (1536, 576): (64, 64, 4, 1, 0, 0),  # smol_gate|up
    (576, 1536): (64, 64, 4, 1, 0, 0),  # smol_down
}


def default_config(N: int, K: int) -> tuple[int, ...]:
    # In the sweeps the masked kernel won below ~4M weights, wide compacting blocks with about
    # two programs per SM above.
    if N * K > 2**22 and N >= 512:
        block_n = 512 if N % 512 == 0 or N >= 8192 else 256
        slice_ = max(128, -(-K * (N // block_n) // 264) // 8 * 8)  # ~264 programs
        return (block_n, 16 if block_n == 512 else 32, 4, 0, 0, slice_, 1)
    return (64, 64, 4, 4, 0, 0)


# fp16 keeps sweep 8's configs (and kernel: no SUM_ROWS, see gemv._rows_per_thread): in the
# same H200 run sweep 9's configs were 10-20% slower in fp16 than in bf16 (qkv_fused at s = 0:
# 19.3 against 16.6 us; down at 50%: 21.6 against 18.4; cause not found).
FP16: dict[tuple[int, int], tuple[int, ...]] = {
    (6144, 4096): (512, 16, 4, 0, 0, 192, 1, 1),
    (4096, 4096): (512, 16, 4, 0, 0, 128, 1, 1),
    (28672, 4096): (1024, 8, 4, 0, 0, 456, 1, 1),
    (4096, 14336): (1024, 8, 4, 0, 0, 224, 1, 1),
}


# sparse_gemv_into (the accumulating kernel the decoder runs): sweep 10
# (kernels/results/h200/gemv_tune_v10_accum.json, both dtypes). Without the arrival counter the
# SUM_ROWS kernel needs 89 registers instead of 104, ptxas issues the next tile's last W rows
# later, and it lost 10-30% (bf16 q|o at 50%: 8.70 us with it, fp16 7.00 without); two tiles in
# flight capped at 128 registers won back part of it only. So the 2-D accumulator for every
# shape, with fp16's winners in both dtypes (kernels/README.md, item 13).
# Two changes since, from sweeps 13 and 14 (kernels/README.md, items 20-21): fused gate/up takes
# sweep 13's bf16 winner in both dtypes (296-channel slices, 2 tiles in flight, the 1-D
# accumulator: fp16 56.96 / 32.25 / 16.01 us at s = 0 / 0.5 / 0.8 against 59.23 / 32.31 / 15.45 in
# sweep 14), and fused QKV's 43 slices became 22 of 192 channels, each split evenly by its kept
# count between 2 programs (the last field, share: 9.75 -> 9.59 us bf16 and 9.66 -> 9.46 fp16 at
# 50%, gemv_tune_v14_share.json).
# Since item 26's W prefetch (kernels/README.md, item 28): k|v in bf16 runs fp16's config (sweep 14
# had given bf16 2 programs per 256-channel slice; with the prefetch it lost at every sparsity,
# 5.56 -> 4.98 us at 25%, ab_kv_accum_bf16_*.json), and gate|up takes 1024-column tiles with 2
# programs per 456-channel slice (sweep 16: 18.29 -> 18.00 us bf16, 18.31 -> 17.83 fp16 at 50%).
# Sweep 18 (gemv_tune_v18.json): gate|up on 2048-column tiles of 8 warps, one program per SM (126),
# 17.86 -> 17.36 us fp16 and 17.79 -> 17.24 bf16 at 50%, 31.50 -> 30.94 fp16 at s = 0.
ACCUM: dict[tuple[int, int], tuple[int, ...]] = {
    (6144, 4096): (1024, 8, 4, 0, 0, 192, 1, 1, 0, 0, 0, 0, 2),  # qkv_fused
    (4096, 4096): (512, 8, 2, 0, 0, 64, 1, 1, 0, 0, 0, 0),  # q|o
    (1024, 4096): (128, 32, 4, 0, 0, 128, 1, 1, 0, 0, 0, 0),  # k|v
    (28672, 4096): (1024, 8, 4, 0, 0, 296, 2, 1, 0, 0, 0, 1),  # gate_up_fused
    (14336, 4096): (2048, 8, 8, 0, 0, 456, 1, 1, 0, 0, 0, 0, 2),  # gate|up
    (4096, 14336): (1024, 8, 4, 0, 0, 224, 1, 1, 0, 0, 0, 0),  # down
}



def config_for(N: int, K: int, dtype=None, accum: bool = False) -> tuple[int, ...]:
    """The launch config for an [N, K] projection; `dtype` (a torch dtype or its name) picks the
    fp16 entries of `sparse_gemv` where they differ, `accum` the accumulating kernel's
    (sparse_gemv_into, one table for both dtypes)."""
    name = None if dtype is None else str(dtype).removeprefix("torch.")
    if accum and (N, K) in ACCUM:
        return ACCUM[(N, K)]
    if name == "float16" and (N, K) in FP16:
        return FP16[(N, K)]
    return TABLE.get((N, K)) or default_config(N, K)
