"""`teal-nb generate`: stream a greedy continuation with TEAL sparsity; print tokens/s and realized sparsity."""
from __future__ import annotations

HELP = "generate text with the static-cache decoder, dense or TEAL-sparse; prints tokens/s and realized sparsity"


def add_arguments(p) -> None:
    p.add_argument("prompt", nargs="?", default="The capital of France is", help="the prompt text")
    p.add_argument("--model", default="smollm2-135m", help="preset name, HF id or local folder")
    p.add_argument("--sparsity", type=float, default=0.0, help="target sparsity (0 = dense)")
    p.add_argument("--allocation", default="uniform",
                   help="'uniform' or a saved allocation name (thresholds from C4 calibration)")
    p.add_argument("--calibration", default="c4", choices=("c4", "decode"),
                   help="where thresholds come from: C4 histograms (cached per model; needs TEAL_DATA_DIR "
                        "or the hub) or the prompt's own dense decode steps (no data needed)")
    p.add_argument("--no-refine", action="store_true",
                   help="C4 thresholds of the dense model (TEAL's), without re-deriving them under sparsity")
    p.add_argument("--thresholds", default=None, help="a saved ThresholdTable (.safetensors); overrides the above")
    p.add_argument("--prefill", default="none", choices=("none", "last_half", "all"),
                   help="which prompt tokens are sparse (decode steps always are; default none)")
    p.add_argument("--backend", default=None, choices=("torch", "triton"),
                   help="sparse backend (default: triton on a GPU, torch on a CPU)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, help="default: the preset's (fp32 on CPU)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (reduce-overhead on a GPU); realized sparsity is then not counted")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")


def run(args) -> int:
    import sys

    import torch

    from teal_nb.config import SITES, check_sparsity
    from teal_nb.decode import Decoder
    from teal_nb.models import load_model

    check_sparsity(args.sparsity)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or (None if device == "cpu" else "bfloat16")
    model, tok = load_model(args.model, dtype=dtype, device=device)
    if args.chat:
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(args.prompt, return_tensors="pt").input_ids
    n_new = args.max_new_tokens
    dec = Decoder.from_hf(model, max_seq_len=ids.shape[1] + n_new + 1)
    backend = args.backend or ("triton" if device.startswith("cuda") else "torch")

    sparse = args.sparsity > 0 or args.thresholds
    if args.thresholds:
        from teal_nb.thresholds import ThresholdTable

        thresholds, source = ThresholdTable.load(args.thresholds, model).values, args.thresholds
    elif args.sparsity > 0 and args.calibration == "c4":
        from teal_nb.thresholds import table_for

        try:
            thresholds = table_for(model, tok, args.sparsity, allocation=args.allocation,
                                   refine=not args.no_refine).values
        except (FileNotFoundError, OSError, ImportError) as e:
            raise FileNotFoundError(f"C4 calibration unavailable ({e}); set TEAL_DATA_DIR, or use "
                                    "--calibration decode") from e
        source = f"C4 calibration, {args.allocation}"
    elif args.sparsity > 0:
        from teal_nb.decode_calibrate import calibrate_decode

        thresholds = calibrate_decode(dec, ids, n_new, args.sparsity, iters=2)
        source = "the prompt's own decode steps"
    if sparse:
        dec.set_sparsity(thresholds, backend=backend, prefill=args.prefill)
        print(f"[{args.model}: sparsity {args.sparsity:g}, thresholds from {source}, backend {backend}, "
              f"prefill {args.prefill}]", file=sys.stderr)
    else:
        print(f"[{args.model}: dense]", file=sys.stderr)
    if args.compile:
        dec.compile("reduce-overhead" if device.startswith("cuda") else "default")
        dec.generate(ids, min(n_new, 4))  # compile outside the timed generation
    dec.count = sparse and not args.compile
    dec.reset_stats()

    generated: list[int] = []
    shown = ""
    sys.stdout.write(args.prompt if not args.chat else "")

    def stream(t):
        nonlocal shown
        generated.append(int(t[0]))
        text = tok.decode(generated, skip_special_tokens=True)
        sys.stdout.write(text[len(shown):])
        sys.stdout.flush()
        shown = text

    _, timing = dec.generate(ids, n_new, stream=stream, eos_token_id=tok.eos_token_id)
    print()
    print(f"{timing['new_tokens']} tokens; decode {timing['decode_tok_s']:.1f} tok/s, "
          f"prefill {1e3 * timing['prefill_s']:.0f} ms ({device}, {str(dec.dtype).replace('torch.', '')})")
    if dec.count:
        r = dec.realized()
        site = torch.nanmean(r, dim=0)
        params = torch.tensor([dec.cfg.site_params()[s] for s in SITES], dtype=torch.float64)
        overall = float((site.double() * params).sum() / params.sum())
        print("realized sparsity on decode steps: " + " ".join(f"{s}={float(v):.3f}" for s, v in zip(SITES, site))
              + f" | parameter-weighted {overall:.3f}")
    return 0
