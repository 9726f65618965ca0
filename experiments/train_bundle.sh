#!/usr/bin/env bash
# The recipe of the bundled models in models/ (docs/models.md): a VQGAN, then the unconditional UNet
# on its frozen latents, then the style-conditional UNet grown from the unconditional one (--init_from), each
# stage boxed in wall time (SIGTERM makes vqgan.py and trainer.py save, export and exit cleanly), then fp16 EMA
# exports into models/. Both UNets read one latent cache (the conditional run's captions are ignored by the other).
# The defaults are the run that made the shipped models: on the 2-core CPU, VQGAN_SECONDS=0 (the shipped VQGAN was
# trained before, with the command in docs/models.md), the UNets for UNCOND_SECONDS and COND_SECONDS. Its decoder was
# fine-tuned later (DECODER_SECONDS=1740, the 29 minutes that gave the shipped decoder; the latents do not change,
# so this stage can run at any time and the UNets stay valid).
#
#   python download_hf.py --dataset_name ../shared/wikiart-mini --image_bytes_key image --metadata_columns style \
#       --rows 8000 --center_crop 128 --jpeg_quality 85 --output_dir data/wikiart128 --workers 2
#   DATA=data/wikiart128 bash experiments/train_bundle.sh
#   # later, training both on from their newest checkpoints (the shipped models' second stage):
#   DATA=data/wikiart128 RESUME=1 UNCOND_SECONDS=3600 COND_SECONDS=3600 bash experiments/train_bundle.sh
#   # on a GPU, e.g.: DEVICE=cuda WORKERS=6 BATCH=256 LR=3e-4 VQGAN_SECONDS=600 UNCOND_SECONDS=1800 ...
#   # the shipped models' later stages: trained on from models/ over all 10,010 paintings, learning rate annealed
#   DATA=../shared/wikiart-mini CONTINUE=1 CONT_UNCOND_STEPS=2600 CONT_COND_STEPS=820 bash experiments/train_bundle.sh
#   DATA=../shared/wikiart-mini CONTINUE=1 SEED=2 CONT_UNCOND_STEPS=2800 CONT_COND_STEPS=0 bash experiments/train_bundle.sh
#   DATA=../shared/wikiart-mini CONTINUE=1 SEED=3 CONT_UNCOND_STEPS=2400 CONT_COND_STEPS=0 bash experiments/train_bundle.sh
#   DATA=../shared/wikiart-mini CONTINUE=1 SEED=2 CONT_UNCOND_STEPS=0 CONT_COND_STEPS=2000 bash experiments/train_bundle.sh
#   DATA=../shared/wikiart-mini CONTINUE=1 SEED=4 CONT_UNCOND_STEPS=0 CONT_COND_STEPS=1000 bash experiments/train_bundle.sh
#
# Variables: DATA (ImageFolder of 128 px paintings), TEXT_EMBEDDINGS (optional: captions encoded in advance by
# text_encoder.py --save, where the text encoder's weights are absent), VQGAN_SECONDS, DECODER_SECONDS (the
# adversarial decoder fine-tune of models/vqgan, vqgan.py --finetune_decoder), UNCOND_SECONDS, COND_SECONDS
# (wall-time boxes), DEVICE (cpu, cuda, mps), WORKERS (image-decoding processes), BATCH, LR,
# RESUME (set: both UNets continue from their newest checkpoints in runs/, optimizer and data order included),
# CONTINUE (set: instead of the stages above, each UNet in models/ trains on (--init_from: its weights, a fresh
# optimizer) for CONT_UNCOND_STEPS / CONT_COND_STEPS steps (0: that one stays as it is), warm-up 200, then a half
# cosine from LR to LR / 10, with data order SEED (default 1; a new SEED for each such stage, runs/unet-*-continued-sSEED), and
# its export replaces it; the conditional one continues from its own weights, not from the new unconditional one),
# POOLED (default 1: the conditional UNet also adds the caption's pooled embedding to its timestep embedding,
# --pooled_text_embed, as the shipped one does since its CONT_COND_STEPS=2000 stage, which added it to a model
# without it; 0: cross-attention only, as the conditional UNet was before that stage).
set -uo pipefail
DATA=${DATA:?set DATA to an ImageFolder of 128 px paintings}
VQGAN_SECONDS=${VQGAN_SECONDS:-0}
DECODER_SECONDS=${DECODER_SECONDS:-0}
UNCOND_SECONDS=${UNCOND_SECONDS:-4200}
COND_SECONDS=${COND_SECONDS:-3900}
DEVICE=${DEVICE:-cpu}
WORKERS=${WORKERS:-1}
BATCH=${BATCH:-32}
LR=${LR:-2e-4}
TEXT=()
[[ -n ${TEXT_EMBEDDINGS:-} ]] && TEXT=(--text_embeddings "$TEXT_EMBEDDINGS")
RESUME_FLAGS=()
[[ -n ${RESUME:-} ]] && RESUME_FLAGS=(--resume auto)
box() { timeout --foreground --preserve-status -s TERM "$@"; }  # --foreground: the signal reaches the script, not its data workers

mkdir -p models runs
if (( VQGAN_SECONDS > 0 )); then
    box "$VQGAN_SECONDS" python vqgan.py --config vq-f4-small --data "$DATA" --out runs/vqgan --resolution 128 \
        --batch_size 32 --bf16 --perceptual effnet --lr 4e-4 --lr_drop_step never --max_steps 1000000 \
        --disc_start never --ckpt_every 2000 --log_every 50 --num_workers "$WORKERS" --scale_images 1024 \
        --export_dtype fp16 --device "$DEVICE" || exit
    cp runs/vqgan/vqgan.safetensors runs/vqgan/vqgan.json models/
fi
if (( DECODER_SECONDS > 0 )); then
    box "$DECODER_SECONDS" python vqgan.py --finetune_decoder --init_ckpt models/vqgan.safetensors --data "$DATA" \
        --out runs/vqgan-ft --resolution 128 --batch_size 8 --lr 5e-5 --disc_weight 0.1 --disc_r1 0 \
        --disc_start 0 --disc_warmup 50 --max_steps 500 --ckpt_every 100 --num_workers "$WORKERS" \
        --export_dtype fp16 --device "$DEVICE" || exit
    cp runs/vqgan-ft/vqgan.safetensors runs/vqgan-ft/vqgan.json models/
fi

UNET=(--dataset_path "$DATA" --vqgan_ckpt models/vqgan --resolution 128 --unet_size small
      --schedule scaled_linear --beta_start 0.0015 --beta_end 0.0195 --min_snr_gamma 5
      --batch_size "$BATCH" --lr "$LR" --warmup_steps 200 --ema_decay 0.999 --max_steps 1000000
      --save_every 200 --sample_every 400 --log_every 20 --num_workers "$WORKERS" --device "$DEVICE"
      --latent_cache runs/latents128 "${RESUME_FLAGS[@]}")
COND=(--conditional --caption_template "a {style} painting" "${TEXT[@]}")
if (( ${POOLED:-1} )); then COND+=(--pooled_text_embed); else COND+=(--no-pooled_text_embed); fi
if [[ -n ${CONTINUE:-} ]]; then
    : "${CONT_UNCOND_STEPS:?}" "${CONT_COND_STEPS:?}"
    SEED=${SEED:-1}
    ANNEAL=(--lr_schedule cosine --min_lr "$(python -c "print($LR / 10)")" --seed "$SEED")
    for kind in uncond cond; do
        steps=$CONT_UNCOND_STEPS flags=()
        [[ $kind == cond ]] && steps=$CONT_COND_STEPS flags=("${COND[@]}")
        (( steps > 0 )) || continue
        out=runs/unet-$kind-continued-s$SEED
        python trainer.py "${UNET[@]}" "${flags[@]}" "${ANNEAL[@]}" --max_steps "$steps" \
            --init_from models/unet-$kind --output_dir "$out" > "$out.log" 2>&1 || exit
        python diffusion.py --unet_ckpt_path "$out/unet" --export models/unet-$kind --device cpu || exit
    done
    exit
fi
# the conditional run's cache (latents + captions) serves both runs: build it first, train nothing
python trainer.py "${UNET[@]}" "${COND[@]}" --max_steps 0 --output_dir runs/cache-only > runs/cache.log 2>&1 || exit
box "$UNCOND_SECONDS" python trainer.py "${UNET[@]}" --output_dir runs/unet-uncond > runs/unet-uncond.log 2>&1
python diffusion.py --unet_ckpt_path runs/unet-uncond/unet --export models/unet-uncond --device cpu || exit
box "$COND_SECONDS" python trainer.py "${UNET[@]}" "${COND[@]}" --init_from runs/unet-uncond/unet \
    --output_dir runs/unet-cond > runs/unet-cond.log 2>&1
python diffusion.py --unet_ckpt_path runs/unet-cond/unet --export models/unet-cond --device cpu || exit
tail -n 2 runs/unet-uncond/log.jsonl runs/unet-cond/log.jsonl
