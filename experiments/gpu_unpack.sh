#!/usr/bin/env bash
# Step 3 of training on a rented GPU machine (README, "A rented GPU machine"): re-track the UNets
# experiments/gpu_pack.sh shelved, check every part that came back against DIR/manifest.json (sha256), join them and
# install the models. Any mismatch refuses before a file is written. Then `python diffusion.py` samples with them.
#
#   bash experiments/gpu_unpack.sh DIR            # DIR: the files that came back (manifest.json, *.partNN, log.txt)
#   bash experiments/gpu_unpack.sh DIR /tmp/m     # into another folder (it needs vqgan.* beside the UNets to sample)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DIR=${1:?usage: bash experiments/gpu_unpack.sh DIR [MODELS_DIR] (DIR holds manifest.json and the parts)}
DEST=${2:-models}
[[ $DEST == models ]] && "$PY" packing.py shelve --restore
"$PY" packing.py join "$DIR" --dest "$DEST"
[[ -f $DIR/log.txt ]] && cat "$DIR/log.txt"
exit 0
