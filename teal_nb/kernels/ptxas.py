"""Registers and spills of the compacting sparse GEMV kernel as ptxas allots them for a GPU, on any
machine: Triton compiles the kernel for the target architecture and its bundled ptxas reports.
No GPU is needed. The kernels lab reads these before it spends device time (kernels/README.md,
item 12: the 1-D accumulator took an 8 x 1024 tile on 4 warps from 167 registers to 104).

    python -m teal_nb.kernels.ptxas 1024 8 4 224            # BLOCK_N BLOCK_K warps SLICE
    python -m teal_nb.kernels.ptxas 1024 8 4 224 --no-sum-rows --dtype fp16 --depth 2

Needs Triton's compiler, so not under TRITON_INTERPRET=1 (run it in a subprocess there).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import tempfile

# Per-SM limits of Hopper (sm_90) and Ampere's A100 (sm_80) alike: registers, warps, blocks.
SM_REGISTERS, SM_WARPS, SM_BLOCKS = 65536, 64, 32
POINTER_TYPES = {"thr_ptr": "fp32", "acc_ptr": "fp32", "xv_ptr": "fp32", "clr_ptr": "fp32",
                 "cnt_ptr": "i32", "idx_ptr": "i32", "lcnt_ptr": "i32"}


def programs_per_sm(registers: int, warps: int) -> int:
    """Resident programs per SM allowed by registers (allotted per warp, 8 per thread at a time)
    and by the warp and block limits; shared memory is not counted (this kernel uses little)."""
    per_program = math.ceil(registers / 8) * 8 * 32 * warps
    return min(SM_REGISTERS // per_program, SM_WARPS // warps, SM_BLOCKS)


def kernel_resources(block_n: int, block_k: int, warps: int, slice_: int, depth: int = 1,
                     sum_rows: bool | None = None, dtype: str = "bf16", arch: int = 90,
                     glu: bool = False, accum: bool = False, clear: bool = False,
                     norm: bool = False, k: int = 4096, maxnreg: int | None = None,
                     partials: int = 0, share: int = 1, prefetch: int = 0) -> dict:
    """ptxas's report for `_sparse_gemv_compact_kernel` with this launch config, for sm_<arch>
    (90: the H200's sm_90a; 80: an A100).

    sum_rows=None takes the launcher's own choice (gemv._rows_per_thread) for this config and
    dtype. Integer arguments get the JIT's divisibility-by-16 hint, as in a real launch.
    accum / clear / norm: sparse_gemv_into's variants (fp32 output added to, a buffer zeroed, the
    RMSNorm of a residual stream of k entries computed inside). maxnreg: ptxas's register cap
    (Config.maxnreg); partials: x is a split attention's partials, this many splits of head
    dimension 128 (o_proj's input in the decoder's fused step); share: programs per slice
    (Config.share); prefetch: W rows asked of L2 before the wait (gemv._prefetch_w; the launcher's
    default is gemv.W_PREFETCH_ROWS)."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    from . import gemv

    if gemv.INTERPRET:
        raise RuntimeError("ptxas needs Triton's compiler: run without TRITON_INTERPRET=1")
    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    cfg = gemv.Config(block_n, block_k, warps, slice=slice_, depth=depth)
    if sum_rows is None:
        sum_rows = gemv._rows_per_thread(cfg, tdt)
    kernel = gemv._sparse_gemv_compact_kernel
    constexprs = dict(BLOCK_N=block_n, BLOCK_K=block_k, SCAN=gemv._scan(cfg, slice_),
                      PRODUCED=False, REDUCE=0, HAS_BIAS=False, EVEN_N=True, DEPTH=depth, PDL=arch >= 90,
                      FENCE=False, SUM_ROWS=bool(sum_rows), GLU=glu, NORM=norm,
                      NORM_BLOCK=gemv._norm_block(k), ACCUM=accum, HAS_CLEAR=clear,
                      CLR_BLOCK=32, PARTS=partials, HEAD_D=128, SHARE=share, STAMPS=False,
                      PRELOAD=gemv.NORM_PRELOAD, PF_ROWS=prefetch,
                      PF_LANES=gemv._pf_lanes(warps, prefetch))
    types = dict(POINTER_TYPES, **({"y_ptr": "fp32"} if accum else {}),
                 **({"x_ptr": "fp32"} if norm or partials else {}))
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + types.get(name, dtype)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "eps":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name not in ("SLICE", "CLR_N"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=warps, **({"maxnreg": maxnreg} if maxnreg else {})))
    gpu = f"sm_{arch}" + ("a" if arch >= 90 else "")  # the arch-specific variant (wgmma, setmaxnreg) exists from sm_90
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(compiled.asm["ptx"])
        f.flush()
        out = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", f.name, "-o", "/dev/null"],
                             capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
    return dict(block_n=block_n, block_k=block_k, warps=warps, slice=slice_, depth=depth, dtype=dtype,
                sum_rows=bool(sum_rows), glu=glu, accum=accum, clear=clear, norm=norm, partials=partials,
                share=share, prefetch=prefetch, arch=gpu, registers=registers, spill_bytes=spills,
                programs_per_sm=programs_per_sm(registers, warps))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("block_n", type=int)
    ap.add_argument("block_k", type=int)
    ap.add_argument("warps", type=int)
    ap.add_argument("slice", type=int)
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--sum-rows", dest="sum_rows", action="store_true", default=None)
    ap.add_argument("--no-sum-rows", dest="sum_rows", action="store_false")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--maxnreg", type=int, default=None, help="ptxas's register cap")
    ap.add_argument("--partials", type=int, default=0, help="x: a split attention's partials, this many splits")
    ap.add_argument("--share", type=int, default=1, help="programs per slice (Config.share)")
    ap.add_argument("--prefetch", type=int, default=0, help="W rows prefetched into L2 per program (gemv._prefetch_w)")
    for flag in ("glu", "accum", "clear", "norm"):
        ap.add_argument(f"--{flag}", action="store_true", help=f"the {flag} variant (see kernel_resources)")
    a = ap.parse_args(argv)
    print(json.dumps(kernel_resources(a.block_n, a.block_k, a.warps, a.slice, a.depth, a.sum_rows,
                                      a.dtype, a.arch, a.glu, a.accum, a.clear, a.norm,
                                      maxnreg=a.maxnreg, partials=a.partials, share=a.share,
                                      prefetch=a.prefetch)))


if __name__ == "__main__":
    main()
