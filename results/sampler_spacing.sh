#!/bin/bash
# Sampler spacing study on the bundled unconditional model (results/sampler_spacing.md): 200 samples per variant,
# FD/KID (EfficientNet-Lite0) against 200 of the 700 test paintings, fp32, one thread. Run from the repository root;
# a variant whose JSON exists is skipped, so an interrupted study resumes.
set -u
export OMP_NUM_THREADS=1
mkdir -p runs/eval
for steps in 20 10; do
  for variant in even karras even-lof; do
    case $variant in
      even) flags="--spacing even";;
      karras) flags="--spacing karras";;
      even-lof) flags="--spacing even --lower_order_final";;
    esac
    name=uncond_dpmpp-2m-${steps}_${variant}_n200
    [ -f "runs/eval/$name.json" ] && continue
    python evaluate.py --samples_from models/unet-uncond --n 200 --real ../shared/wikiart-mini --real_split test \
      --resolution 128 --fake "runs/eval/$name" --steps "$steps" $flags --precision fp32 \
      --out "runs/eval/$name.json" > "runs/eval/$name.log" 2>&1
    echo "$name rc=$?"
  done
done
