"""Launch configurations of the sparse GEMV kernel, keyed by (N, K), chosen by measurement.

A config is (BLOCK_N, BLOCK_K, num_warps, PROGS_PER_SM, REDUCE, SLICE[, NUM_STAGES]); SLICE = 0
selects the masked kernel, SLICE > 0 the compacting one (see gemv._launch). The table was filled by
`kernels/tune_gemv.py` on one NVIDIA H200: for each shape the config with the lowest sum over
sparsities 0, 0.5 and 0.8 of time / best time. Llama-3-8B shapes from the last sweep
(kernels/results/h200/gemv_tune.json), the embedded model's from the one before
(gemv_tune_v3.json); kernels/results/h200/gemv.json was measured with exactly this table.
Shapes not in the table get `default_config`, a size rule read off the same sweeps.
"""
from __future__ import annotations

TABLE: dict[tuple[int, ...], tuple[int, ...]] = {
    (6144, 4096): (128, 32, 4, 0, 0, 512, 0),  # qkv_fused
    (4096, 4096): (64, 64, 4, 4, 0, 0, 0),  # q|o
    (1024, 4096): (64, 64, 4, 4, 0, 0, 0),  # k|v
    (28672, 4096): (256, 32, 4, 0, 0, 2048, 3),  # gate_up_fused
    (14336, 4096): (256, 32, 4, 0, 0, 1024, 0),  # gate|up
    (4096, 14336): (128, 32, 4, 0, 0, 2048, 4),  # down
    (960, 576): (64, 32, 4, 8, 0, 0),  # smol_qkv_fused
    (576, 576): (64, 32, 4, 2, 0, 0),  # smol_q|o
    (192, 576): (64, 32, 4, 4, 0, 0),  # smol_k|v
    (3072, 576): (64, 64, 4, 2, 0, 0),  # smol_gate_up_fused
    (1536, 576): (64, 64, 4, 1, 0, 0),  # smol_gate|up
    (576, 1536): (64, 64, 4, 1, 0, 0),  # smol_down
}


def default_config(N: int, K: int) -> tuple[int, ...]:
    # In the sweeps the masked kernel won below ~16M weights, the compacting one above.
    if N * K >= 24 * 2**20:
        return (128, 32, 4, 0, 0, 1024, 0)
    return (64, 64, 4, 4, 0, 0, 0)


def config_for(N: int, K: int) -> tuple[int, ...]:
    return TABLE.get((N, K)) or default_config(N, K)
