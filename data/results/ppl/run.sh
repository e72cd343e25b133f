#!/usr/bin/env bash
# The perplexity table of chapter 3: dense, and uniform / greedy / global at 25/40/50/65%, on the
# same 8 WikiText-2 samples (seed 0) x 1024 tokens, loss on the last 512, prefill last_half,
# thresholds refined on the sparsified model (teal-nb ppl defaults). One thread: the CPU is shared.
# Run from the repository root: bash data/results/ppl/run.sh
set -euo pipefail
export OMP_NUM_THREADS=1
export TEAL_DATA_DIR=${TEAL_DATA_DIR:-$(cd .. && pwd)/shared/data} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
out=data/results/ppl
samples=${SAMPLES:-8}
run() {  # name, then teal-nb ppl arguments
  local name=$1; shift
  [ -s "$out/$name.json" ] && { echo "have $name"; return; }
  .venv/bin/teal-nb ppl --samples "$samples" --json --quiet --out "$out/$name.json" "$@" > /dev/null
  case $name in greedy*|global*)  # which allocation file the record was made with
    .venv/bin/python - "$out/$name.json" data/allocations/smollm2-135m.safetensors <<'PY'
import hashlib, json, subprocess, sys
rec, alloc = sys.argv[1], sys.argv[2]
r = json.load(open(rec))
r["allocation_file"] = alloc
r["allocation_sha256"] = hashlib.sha256(open(alloc, "rb").read()).hexdigest()
r["allocation_commit"] = subprocess.run(["git", "log", "-1", "--format=%H", "--", alloc], capture_output=True,
                                        text=True).stdout.strip()
# The paths themselves (the file's metadata also holds timings, which a re-run changes).
from safetensors import safe_open
with safe_open(alloc, "pt") as f:
    h = hashlib.sha256()
    for k in ("sparsity", "error", "uniform_error", "effective"):
        h.update(f.get_tensor(k).numpy().tobytes())
r["allocation_paths_sha256"] = h.hexdigest()
json.dump(r, open(rec, "w"), indent=1)
open(rec, "a").write("\n")
PY
  esac
  echo "$name $(python3 -c "import json,sys; print(round(json.load(open(sys.argv[1]))['ppl'], 3))" "$out/$name.json")"
}
run dense
for s in 0.25 0.40 0.50 0.65; do
  for a in uniform greedy global; do
    run "${a}_${s#0.}" --allocation "$a" --sparsity "$s"
  done
done
