#!/usr/bin/env bash
# The recipe for the bundled models in models/ on an accelerator (README, "Training your own"): a VQGAN first, then
# the unconditional and the style-conditional UNet side by side on its frozen latents, each stage boxed in wall time
# (SIGTERM makes vqgan.py and trainer.py save, export and exit cleanly), then fp16 EMA exports into models/.
# VQGAN_SECONDS=0 keeps the VQGAN already in models/ (the shipped one was trained on a CPU: README, VQGAN section).
#
#   python download_hf.py --dataset_name ../shared/wikiart-mini --image_bytes_key image --metadata_columns style \
#       --rows 8000 --center_crop 128 --jpeg_quality 85 --output_dir wikiart128 --workers 2
#   python text_encoder.py --save style_captions --dataset_path wikiart128 --caption_template "a {style} painting"
#   DATA=wikiart128 TEXT_EMBEDDINGS=style_captions bash results/train_bundle.sh
#
# Variables: DATA (ImageFolder of 128 px paintings), TEXT_EMBEDDINGS (optional: captions encoded in advance),
# VQGAN_SECONDS, UNET_SECONDS (wall-time boxes), DEVICE (cuda, cpu, mps), WORKERS (image-decoding processes).
set -uo pipefail
DATA=${DATA:?set DATA to an ImageFolder of 128 px paintings}
VQGAN_SECONDS=${VQGAN_SECONDS:-200}
UNET_SECONDS=${UNET_SECONDS:-270}
DEVICE=${DEVICE:-cuda}
WORKERS=${WORKERS:-6}
TEXT=()
[[ -n ${TEXT_EMBEDDINGS:-} ]] && TEXT=(--text_embeddings "$TEXT_EMBEDDINGS")
box() { timeout --foreground --preserve-status -s TERM "$@"; }  # --foreground: the signal reaches the script, not its data workers

mkdir -p models runs
if (( VQGAN_SECONDS > 0 )); then
    box "$VQGAN_SECONDS" python vqgan.py --config vq-f4-small --data "$DATA" --out runs/vqgan --resolution 128 \
        --batch_size 32 --bf16 --perceptual effnet --lr 4e-4 --max_steps 1000000 --disc_start 100000000 \
        --ckpt_every 2000 --log_every 50 --num_workers "$WORKERS" --scale_images 1024 --export_dtype fp16 \
        --device "$DEVICE" || exit
    cp runs/vqgan/vqgan.safetensors runs/vqgan/vqgan.json models/
fi

UNET=(--dataset_path "$DATA" --vqgan_ckpt models/vqgan --resolution 128 --unet_size small
      --schedule scaled_linear --beta_start 0.0015 --beta_end 0.0195 --min_snr_gamma 5
      --batch_size 256 --lr 3e-4 --warmup_steps 300 --ema_decay 0.999 --max_steps 1000000
      --save_every 2000 --sample_every 2000 --log_every 50 --num_workers "$WORKERS" --device "$DEVICE")
box "$UNET_SECONDS" python trainer.py "${UNET[@]}" --output_dir runs/unet-uncond > runs/unet-uncond.log 2>&1 &
box "$UNET_SECONDS" python trainer.py "${UNET[@]}" --conditional --caption_template "a {style} painting" \
    "${TEXT[@]}" --output_dir runs/unet-cond > runs/unet-cond.log 2>&1 &
wait
tail -n 3 runs/unet-uncond.log runs/unet-cond.log
for name in uncond cond; do
    python diffusion.py --unet_ckpt_path "runs/unet-$name/unet" --export "models/unet-$name" --device cpu
done
