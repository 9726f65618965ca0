#!/usr/bin/env bash
# Step 1 of training on a rented GPU machine (README, "A rented GPU machine"): pack on this computer everything
# experiments/train_gpu.sh needs into one ignored folder (.gpu), keep the shipped UNets out of the checkout that
# travels, and print the size of what would be sent, refusing above 60 MiB.
#
#   bash experiments/gpu_pack.sh              # the latent cache is built once (38 min on a 2-core CPU), then reused
#   #   send the checkout with .gpu; there run `bash experiments/train_gpu.sh` (OUT: the folder that comes back)
#   bash experiments/gpu_unpack.sh DIR        # afterwards: re-track the UNets, check the parts, install into models/
#   bash experiments/gpu_pack.sh --restore    # re-track the UNets without unpacking (a run that brought nothing)
#   SMOKE=1 bash experiments/gpu_pack.sh      # 8 images into .gpu-smoke, git untouched (for SMOKE=1 train_gpu.sh)
#
# The packed folder (CARRY, default .gpu; ignored by .gitignore):
#   latents/          the latent cache of the DATA train split, every painting and its mirror image, as 11-bit
#                     VQGAN codes (packing.py latents; 10,010 paintings: 27 MiB instead of 156 MiB of fp16 latents)
#   style_captions.*  the captions' text embeddings (text_encoder.py --save): the GPU machine needs no MiniLM weights
# The shipped models/unet-*.safetensors (48 MiB) are untracked and excluded (packing.py shelve, files left on disk)
# until gpu_unpack.sh or --restore re-tracks them: do not commit in between.
# The cache is encoded in fp32 (--no-bf16): on a CPU without fast bf16 the VQGAN encoder ran over 20 times slower
# under bf16 autocast (fp32: 0.11 s an encode on 2 cores, 20,020 encodes). BF16=1 encodes as train_bundle.sh's
# cache does. Printed sizes of a full pack: results/history/performance/gpu_pack_wikiart-mini.txt (39.0 MiB).
# Variables: DATA (default ../shared/wikiart-mini), CARRY, CACHE (latent cache folder), MAX_IMAGES (default all;
# SMOKE: 8), BF16, PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[[ ${1:-} == --restore ]] && exec "$PY" packing.py shelve --restore
SMOKE=${SMOKE:-}
DATA=${DATA:-../shared/wikiart-mini}
if [[ -n $SMOKE ]]; then
    CARRY=${CARRY:-.gpu-smoke} CACHE=${CACHE:-runs/gpu-smoke-cache} MAX_IMAGES=${MAX_IMAGES:-8}
else
    CARRY=${CARRY:-.gpu} CACHE=${CACHE:-runs/gpu-latents-wikiart-mini-128} MAX_IMAGES=${MAX_IMAGES:-}
fi
LIMIT=()
[[ -n $MAX_IMAGES ]] && LIMIT=(--max_images "$MAX_IMAGES")
ENCODE=(--no-bf16)
[[ -n ${BF16:-} ]] && ENCODE=(--bf16)
CAPTIONS=(--caption_template "a {style} painting")   # as experiments/train_gpu.sh's COND_RECIPE
SHIPPED=(models/unet-uncond.safetensors models/unet-cond.safetensors)

# the conditional latent cache (latents + captions) of the train split at 128 px, as trainer.py builds it
"$PY" trainer.py --dataset_path "$DATA" --vqgan_ckpt models/vqgan --resolution 128 --conditional "${CAPTIONS[@]}" \
    "${LIMIT[@]}" "${ENCODE[@]}" --max_steps 0 --latent_cache "$CACHE" --output_dir runs/gpu-cache
mkdir -p "$CARRY"
"$PY" text_encoder.py --save "$CARRY/style_captions" --dataset_path "$DATA" "${CAPTIONS[@]}" "${LIMIT[@]}"
"$PY" packing.py latents --latent_cache "$CACHE" --vqgan_ckpt models/vqgan --out "$CARRY/latents"
if [[ -n $SMOKE ]]; then
    "$PY" packing.py size --carry "$CARRY" --leave_out "${SHIPPED[@]}" --limit_mib 60
else
    "$PY" packing.py shelve "${SHIPPED[@]}"
    "$PY" packing.py size --carry "$CARRY" --limit_mib 60
fi
