#!/bin/bash
# Sampler spacing study on the bundled unconditional model (docs/sampler-steps.md): DPM-Solver++(2M) with even
# spacing, Karras spacing and even spacing with a first-order final step, at each step count; FD/KID
# (EfficientNet-Lite0) of N samples (seeds 0..N-1) against the `test` paintings. Run from the repository root with
# nothing else on the machine; a cell whose JSON already holds this evaluation is kept (evaluate.py --skip_done), so
# an interrupted study resumes; a JSON made by another model (one retrained in place) stops that cell with an error:
# give a new OUT. Prints the table.
#
#   bash experiments/sampler_spacing.sh                       # the full table: 1,000 samples, 10/15/20/30 steps
#   N=200 STEPS="20 10" bash experiments/sampler_spacing.sh   # the first, smaller study (200 of the 700 test)
#
# Variables: N (samples a cell, default 1000; evaluate.py --n also takes a fixed random N of the test paintings
# where there are more), STEPS (default "10 15 20 30"), PRECISION (diffusion.py's --precision, default auto),
# OUT (default runs/eval/spacing).
set -u
N=${N:-1000}
STEPS=${STEPS:-10 15 20 30}
PRECISION=${PRECISION:-auto}
OUT=${OUT:-runs/eval/spacing}
mkdir -p "$OUT"
declare -A FLAGS=([even]="--spacing even" [karras]="--spacing karras" [even-lof]="--spacing even --lower_order_final")
for steps in $STEPS; do
  for variant in even karras even-lof; do
    name=uncond_dpmpp-2m-${steps}_${variant}_n$N
    # shellcheck disable=SC2086  # FLAGS holds several words
    python evaluate.py --samples_from models/unet-uncond --n "$N" --real ../shared/wikiart-mini --real_split test \
      --resolution 128 --fake "$OUT/$name" --steps "$steps" ${FLAGS[$variant]} \
      --precision "$PRECISION" --out "$OUT/$name.json" --skip_done > "$OUT/$name.log" 2>&1
    echo "$name rc=$?: $(tail -n 1 "$OUT/$name.log")"
  done
done
python - "$OUT" "$N" $STEPS <<'EOF'
import json, sys
from pathlib import Path
out, n, steps = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
variants = ["even", "karras", "even-lof"]
print(f"| dpmpp-2m, {n} samples: FD / KID | even | karras | even + lower_order_final |")
print("|---|---|---|---|")
for s in steps:
    cells = []
    for v in variants:
        path = out / f"uncond_dpmpp-2m-{s}_{v}_n{n}.json"
        scores = json.loads(path.read_text()) if path.exists() else None
        cells.append(f"{scores['FD_effnet-lite0']:.1f} / {scores['KID_effnet-lite0']:.4f}" if scores else "")
    print(f"| {s} steps | " + " | ".join(cells) + " |")
EOF
