#!/usr/bin/env bash
# Step 2 of training on a rented GPU machine (README, "A rented GPU machine"), the one command run there: train the
# unconditional UNet, then the conditional one grown from it (--init_from), on the packed latents that
# experiments/gpu_pack.sh put in .gpu; after each stage export fp16 EMA weights and write them into $OUT at once, as
# parts of at most 15 MiB with a sha256 manifest (packing.py split), so a run cut short still returns the finished
# stages; then, if time remains, bench.py on the GPU. An outer timeout ends everything by DEADLINE_SECONDS (510 s =
# 8.5 min) of wall time. $OUT/log.txt gets a short timeline (steps, samples/s, loss).
#
# On the GPU machine, in the checkout sent there with its .gpu folder (experiments/gpu_pack.sh prints its size):
#   OUT=<folder that comes back> bash experiments/train_gpu.sh
# then, back here, `bash experiments/gpu_unpack.sh <that folder>`. $OUT holds at most 7 files: manifest.json,
# unet-uncond.part00-01, unet-cond.part00-01, log.txt, bench_cuda.json. The GPU machine needs python3 with torch
# only: no `datasets` and no text-encoder weights (trainer.py --packed_latents and --text_embeddings need neither).
#
# On a CPU, the same path with tiny step counts (a few minutes; after SMOKE=1 bash experiments/gpu_pack.sh):
#   SMOKE=1 OUT=/tmp/gpu-out bash experiments/train_gpu.sh && bash experiments/gpu_unpack.sh /tmp/gpu-out /tmp/models
# Variables: OUT (required), SMOKE, CARRY (default .gpu; SMOKE: .gpu-smoke), WORK (runs/gpu; SMOKE: runs/gpu-smoke),
# DEADLINE_SECONDS, PYTHON (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."

# ---- The recipe: change it here, in one place (docs/ablation.md measures the levers). ----------------------------
UNCOND_SECONDS=${UNCOND_SECONDS:-200}    # wall-time box of each training stage, start-up included
COND_SECONDS=${COND_SECONDS:-200}
RECIPE=(--unet_size small --schedule scaled_linear --beta_start 0.0015 --beta_end 0.0195 --min_snr_gamma 5
        --batch_size 256 --lr 3e-4 --warmup_steps 200 --ema_decay 0.999 --bf16)
COND_RECIPE=(--conditional --caption_template "a {style} painting" --cond_drop 0.1   # gpu_pack.sh's captions
             --pooled_text_embed)   # as the shipped conditional UNet
BENCH=(--sections unet sampler --bf16 --batch_size 256 --sample_batch 64)
# ---------------------------------------------------------------------------------------------------------------------

OUT=${OUT:?set OUT to the folder that comes back from the GPU machine}
PY=${PYTHON:-python3}
DEADLINE_SECONDS=${DEADLINE_SECONDS:-510}
RESERVE_SECONDS=40    # what an export and its split take after a stage's box
if [[ -n ${SMOKE:-} ]]; then
    CARRY=${CARRY:-.gpu-smoke} WORK=${WORK:-runs/gpu-smoke} DEVICE=cpu
    RUN=(--max_steps 3 --batch_size 4 --log_every 1 --no-bf16)   # bf16 is slow on CPUs without AVX512-BF16
    BENCH=(--sections unet --unet_size tiny --repeats 1 --batch_size 2)
else
    CARRY=${CARRY:-.gpu} WORK=${WORK:-runs/gpu} DEVICE=cuda
    RUN=(--max_steps 1000000 --log_every 100)
fi
if [[ -z ${TRAIN_GPU_BOXED:-} ]]; then   # the outer box: TERM at the deadline, KILL 15 s later
    TRAIN_GPU_BOXED=1 exec timeout -k 15 "$DEADLINE_SECONDS" bash "$0" "$@"
fi
mkdir -p "$OUT" "$WORK/models"
note() { printf '[%4ds] %s\n' "$SECONDS" "$*" | tee -a "$OUT/log.txt"; }
trap 'note "deadline (${DEADLINE_SECONDS}s) reached: stopped"; exit 124' TERM

# Train stage NAME for at most SECONDS (SIGTERM makes trainer.py save and export), then export fp16 EMA weights
# into WORK/models (beside a copy of the VQGAN, so the export refers to it as models/ does) and split them into OUT.
stage() {
    local name=$1 seconds=$2 left status
    shift 2
    left=$((DEADLINE_SECONDS - SECONDS - RESERVE_SECONDS))
    ((seconds > left)) && seconds=$left
    if ((seconds < 20)); then note "$name: skipped (${left}s left)"; return 1; fi
    note "$name: training for at most ${seconds}s"
    timeout --foreground --preserve-status -s TERM "$seconds" "$PY" trainer.py --packed_latents "$CARRY/latents" \
        --vqgan_ckpt "$WORK/models/vqgan" --device "$DEVICE" "${RECIPE[@]}" "${RUN[@]}" --save_every 1000000 \
        --keep_last 1 --sample_every 0 --output_dir "$WORK/$name" "$@" > "$WORK/$name.log" 2>&1
    status=$?
    "$PY" packing.py timeline "$WORK/$name/log.jsonl" | sed 's/^/        /' | tee -a "$OUT/log.txt"
    if ((status != 0)) || [[ ! -f $WORK/$name/unet.json ]]; then
        note "$name: trainer.py exited $status; its last lines:"
        tail -n 4 "$WORK/$name.log" | tr '\r' '\n' | tail -n 4 | tee -a "$OUT/log.txt"
        return 1
    fi
    "$PY" diffusion.py --unet_ckpt_path "$WORK/$name/unet" --export "$WORK/models/$name" --device cpu > /dev/null &&
        "$PY" packing.py split "$WORK/models/$name.safetensors" "$WORK/models/$name.json" --name "$name" \
            --out "$OUT" | tee -a "$OUT/log.txt" && note "$name: exported into $OUT"
}

note "train_gpu.sh: $(git log -1 --format='%h %s' 2>/dev/null | cut -c1-80)"
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())" \
    2>&1 | tee -a "$OUT/log.txt"
cp models/vqgan.safetensors models/vqgan.json "$WORK/models/"
INIT=()
if stage unet-uncond "$UNCOND_SECONDS"; then
    INIT=(--init_from "$WORK/unet-uncond/unet")
fi
stage unet-cond "$COND_SECONDS" "${COND_RECIPE[@]}" --text_embeddings "$CARRY/style_captions" "${INIT[@]}"
left=$((DEADLINE_SECONDS - SECONDS - 10))
if ((left >= 40)); then
    note "bench.py for at most ${left}s"
    timeout "$left" "$PY" bench.py --device "$DEVICE" "${BENCH[@]}" --out "$OUT/bench_$DEVICE.json" > "$WORK/bench.log" 2>&1
    grep -E "^(device|unet|train|sampler) " "$WORK/bench.log" | cut -c1-120 | tee -a "$OUT/log.txt"
fi
note "done: $(ls "$OUT" | tr '\n' ' ')"
