#!/usr/bin/env bash
# The --like figure: three test paintings, each followed by four variations from pure noise (--strength 1, the
# embedding alone) and four from the painting itself (the default strength); below, a blend from one painting to
# another at mix 0-1. Run from the repository root: MODEL=models/unet-like OUT=results/current/FILE.png
set -euo pipefail
MODEL=${MODEL:-models/unet-like}
OUT=${OUT:?set OUT to the figure to write}
WORK=$(mktemp -d)
python - "$WORK" <<'PY'
import sys
from images import ImageSource, image_to_tensor, tensor_to_images
source = ImageSource("../shared/wikiart-mini", "test", "image")
for i in (3, 40, 250):
    tensor_to_images(image_to_tensor(source.image(i), 128)[None])[0].save(f"{sys.argv[1]}/test{i:03d}.png")
PY
for i in 003 040 250; do
  python diffusion.py --unet_ckpt_path "$MODEL" --like "$WORK/test$i.png" --strength 1 --num_images 4 --outdir "$WORK/noise$i"
  python diffusion.py --unet_ckpt_path "$MODEL" --like "$WORK/test$i.png" --num_images 4 --outdir "$WORK/like$i"
done
for mix in 0 0.25 0.5 0.75 1; do
  python diffusion.py --unet_ckpt_path "$MODEL" --like "$WORK/test040.png" --like "$WORK/test250.png" --mix $mix \
    --num_images 1 --seed 7 --outdir "$WORK/blend"
done
python - "$WORK" "$OUT" <<'PY'
import sys
from pathlib import Path
from PIL import Image
from images import make_grid, save_png
work = Path(sys.argv[1])
rows = []
for i in ("003", "040", "250"):
    rows += [work / f"test{i}.png", *sorted((work / f"noise{i}").glob("0000?.png")),
             *sorted((work / f"like{i}").glob("0000?.png"))]
blend = [work / "test040.png", *sorted((work / "blend").glob("0000?.png")), work / "test250.png"]
images = [Image.open(p).convert("RGB") for p in rows] + [Image.open(p).convert("RGB") for p in blend]
save_png(sys.argv[2], make_grid(images, ncols=9))
PY
rm -rf "$WORK"
