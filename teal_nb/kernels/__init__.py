"""Triton kernels and their pure-torch references.

Sparse GEMV (TEAL's decode kernel), the API the decoder uses::

    from teal_nb.kernels import prepare_weight, sparse_gemv, sparse_gemv_reference

    wt = prepare_weight(w)          # w: [N, K] nn.Linear weight (or a list to fuse, e.g. [wq, wk, wv])
                                    # -> W^T contiguous [K, N]; done once, outside the decode step
    y = sparse_gemv(x, wt, thresholds, splits=None, bias=None)
        # x: [..., K]; thresholds: fp32 tensor [len(splits)], one per output segment
        # (fused QKV -> 3, fused gate/up -> 2, single -> 1); splits: output sizes summing to N
        # (None = one segment). Entries with |x| <= t are treated as zero (keep |x| > t; NaN is
        # dropped, +-inf kept unless t = inf). Returns [..., N] in x's dtype, fp32 accumulation.
    y_ref = sparse_gemv_reference(x, wt, thresholds, splits=None, bias=None)   # pure torch, fp32

    sparse_gemv_into(out, x, wt, thresholds, splits=None, bias=None, glu=False,
                     norm_weight=None, eps=1e-5, clear=None, partials=False)
        # out (fp32 [N]) += the masked product, not rounded: no split-K counter, no new tensor.
        # norm_weight: x is the residual stream, RMSNorm is computed inside the kernel;
        # glu: x is [gate | up]; clear: an fp32 buffer the launch zeroes (the next one's out);
        # partials: x is a split attention's partials, combined as it is read (attention_input).
        # Twin: sparse_gemv_into_reference (same signature).

Keep `thresholds` on x's device (a CPU tensor is copied on every call, which a CUDA graph
cannot capture). Launch configs per (N, K) are in `tuning.py` (measured on an H200); the
kernels and their design notes are in `gemv.py`, the benchmark in `bench.py`.

`sparse_gemv` is the torch custom op `torch.ops.teal_nb.sparse_gemv` (torch.compile and CUDA
graphs capture it). One token (x with one row) runs the Triton kernel on a GPU, or on CPU when
TRITON_INTERPRET=1 was set before this package was imported; several rows on a GPU mask x
explicitly and run cuBLAS per segment; on CPU without the interpreter it runs the reference.
The kernel keeps a per-device scratch buffer that it leaves zeroed after every call: calls on
one device must be ordered (one stream), as they are in a decode loop.
"""
from .gemv import (attention_input, glu_input, norm_input, prepare_weight, sparse_gemv, sparse_gemv_into,
                   sparse_gemv_into_reference, sparse_gemv_reference)

__all__ = ["attention_input", "glu_input", "norm_input", "prepare_weight", "sparse_gemv", "sparse_gemv_into",
           "sparse_gemv_into_reference", "sparse_gemv_reference"]
