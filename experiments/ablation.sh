#!/usr/bin/env bash
# The training-lever ablation (docs/ablation.md): which training levers make recognisable paintings per CPU-hour.
# Every variant trains the bundled recipe's UNet (experiments/train_bundle.sh: small UNet, scaled-linear schedule,
# min-SNR 5, batch 32, lr 2e-4) from scratch on the same data with the same seed for the same wall-clock budget,
# then is scored by evaluate.py (FD_effnet-lite0 and KID of N samples against the `test` split) and drawn as a
# fixed-seed grid of 16. Both caches (VQGAN latents; EfficientNet-Lite2 REPA targets) are built once, before and
# outside the timed budgets. Run it with nothing else on the machine: the budget is wall-clock.
#
#   bash experiments/ablation.sh                       # every variant, 45 min each (about 4 h plus the caches)
#   VARIANTS="baseline repa" bash experiments/ablation.sh
#   COMBO_FLAGS="--timestep_sampling laplace --repa_weight 0.5" VARIANTS=combo bash experiments/ablation.sh
#   SMOKE=1 bash experiments/ablation.sh               # the whole pipeline on 48 images, 45 s per variant
#   STEPS_PER_VARIANT=511 VARIANTS=laplace bash experiments/ablation.sh   # a step budget instead of the clock
#
# Variables: DATA (training data; its `train` split, default ../shared/wikiart-mini, all 10,010), REAL (the
# reference set, its `test` split), SECONDS_PER_VARIANT (default 2700), STEPS_PER_VARIANT (a fixed number of
# steps instead: rows measured on another machine than the table's clock, at the steps that clock reached), SEED,
# VARIANTS (default: all below), COMBO_FLAGS (the best combination, chosen after the single-lever runs), OUT (runs), LATENT_CACHE (default
# OUT/latents128; its REPA targets go beside it, built only when a chosen variant uses REPA), RESULTS (JSON, grids,
# table.md), N (samples scored), DEVICE, BF16 (--bf16 or --no-bf16; default: trainer.py's, native bf16 only). SMOKE=1 shrinks everything and writes under runs/ablation-smoke only.
set -uo pipefail
DATA=${DATA:-../shared/wikiart-mini}
REAL=${REAL:-../shared/wikiart-mini}
SECONDS_PER_VARIANT=${SECONDS_PER_VARIANT:-2700}
STEPS_PER_VARIANT=${STEPS_PER_VARIANT:-}
SEED=${SEED:-0}
DEVICE=${DEVICE:-cpu}
VARIANTS=${VARIANTS:-baseline logit-normal laplace repa combo}
COMBO_FLAGS=${COMBO_FLAGS:---timestep_sampling logit-normal --repa_weight 0.5}
OUT=${OUT:-runs/ablation}
LATENT_CACHE=${LATENT_CACHE:-$OUT/latents128}   # e.g. experiments/gpu_pack.sh's cache of the same images (same key)
RESULTS=${RESULTS:-results/history/ablation}
N=${N:-1000}
SIZE=()                          # every image; SMOKE takes 48
BATCH=32
STEPS=()                         # sampler steps: diffusion.py's default (20)
BF16=${BF16:-}                   # empty: trainer.py's default, bf16 only where the device computes it natively
if [[ -n ${SMOKE:-} ]]; then
    SECONDS_PER_VARIANT=45 N=16 BATCH=8 OUT=runs/ablation-smoke RESULTS=runs/ablation-smoke/results
    SIZE=(--max_images 48)
    STEPS=(--steps 4)
fi

declare -A LEVERS=(
    [baseline]=""
    [logit-normal]="--timestep_sampling logit-normal"    # Esser et al. 2024: logit(t) ~ N(0, 1)
    [laplace]="--timestep_sampling laplace"              # Hang et al. 2024: log-SNR ~ Laplace(0, 0.5)
    [repa]="--repa_weight 0.5"                           # Yu et al. 2024's weight; middle stage (U-REPA)
    [combo]="$COMBO_FLAGS"
)
# the bundled recipe (experiments/train_bundle.sh), one latent cache and one REPA cache for every variant
RECIPE=(--dataset_path "$DATA" --vqgan_ckpt models/vqgan --resolution 128 --unet_size small
        --schedule scaled_linear --beta_start 0.0015 --beta_end 0.0195 --min_snr_gamma 5
        --batch_size "$BATCH" --lr 2e-4 --warmup_steps 200 --ema_decay 0.999 --max_steps 1000000 --seed "$SEED"
        --save_every 200 --sample_every 0 --log_every 20 --num_workers 1 --device "$DEVICE" ${BF16:+"$BF16"}
        --latent_cache "$LATENT_CACHE" "${SIZE[@]}")
box() { timeout --foreground --preserve-status -s TERM "$@"; }  # SIGTERM: trainer.py saves, exports and exits
exported_step() { python -c 'import json, sys; print(json.load(open(sys.argv[1]))["training"]["step"])' "$1"; }

mkdir -p "$OUT" "$RESULTS"
CACHES=()   # the REPA targets (about 40 min on 2 cores) only if a chosen variant aligns
for variant in $VARIANTS; do [[ ${LEVERS[$variant]:-} == *--repa_weight* ]] && CACHES=(--repa_weight 0.5); done
echo "caches (untimed): $LATENT_CACHE${CACHES:+ and $LATENT_CACHE-repa}"
python trainer.py "${RECIPE[@]}" "${CACHES[@]}" --max_steps 0 --output_dir "$OUT/cache-only" \
    > "$OUT/cache.log" 2>&1 || { tail -n 3 "$OUT/cache.log"; exit 1; }

for variant in $VARIANTS; do
    [[ -v LEVERS[$variant] ]] || { echo "unknown variant $variant (choose: ${!LEVERS[*]})"; exit 2; }
    run="$OUT/$variant"
    rm -rf "$run"  # from scratch, every time
    read -ra flags <<< "${LEVERS[$variant]}"
    if [[ -n $STEPS_PER_VARIANT ]]; then  # the steps, however long they take (the last --max_steps wins)
        echo "$variant: ${flags[*]:-(the bundled recipe)}, $STEPS_PER_VARIANT steps"
        python trainer.py "${RECIPE[@]}" "${flags[@]}" --max_steps "$STEPS_PER_VARIANT" --output_dir "$run" \
            > "$run.log" 2>&1
    else
        echo "$variant: ${flags[*]:-(the bundled recipe)}, ${SECONDS_PER_VARIANT} s"
        box "$SECONDS_PER_VARIANT" python trainer.py "${RECIPE[@]}" "${flags[@]}" --output_dir "$run" \
            > "$run.log" 2>&1
    fi
    [[ -f $run/unet.json ]] || { tail -n 3 "$run.log"; exit 1; }
    name=${variant}_s$(exported_step "$run/unet.json")   # results are named by the step the run reached
    python evaluate.py --samples_from "$run/unet" --n "$N" --real "$REAL" --real_split test --resolution 128 \
        --seed 0 "${STEPS[@]}" --fake "$run/eval_samples" --out "$RESULTS/$name.json" --device "$DEVICE" \
        > "$run.eval.log" 2>&1 || { tail -n 3 "$run.eval.log"; exit 1; }
    python diffusion.py --unet_ckpt_path "$run/unet" --num_images 16 --seed 0 "${STEPS[@]}" --outdir "$run/grid" \
        --device "$DEVICE" > /dev/null 2>&1 || exit 1
    cp "$run/grid/grid-00000.png" "$RESULTS/${name}_grid.png"
done

# one line per variant: steps reached, FD, KID (the table of docs/ablation.md)
python - "$OUT" "$RESULTS" $VARIANTS <<'EOF'
import json, sys
from pathlib import Path
out, results, variants = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
rows = []
for variant in variants:
    steps = json.loads((out / variant / "unet.json").read_text())["training"]["step"]  # the exported step
    scores = json.loads((results / f"{variant}_s{steps}.json").read_text())
    fd, kid = scores["FD_effnet-lite0"], scores["KID_effnet-lite0"]
    rows.append(f"| {variant} | {steps} | {fd:.1f} | {kid:.4f} | ![]({variant}_s{steps}_grid.png) |")
table = "\n".join(["| variant | steps | FD_effnet-lite0 | KID | grid |", "|---|---|---|---|---|", *rows])
(results / "table.md").write_text(table + "\n")
print(table)
EOF
