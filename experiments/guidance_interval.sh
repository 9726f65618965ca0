#!/bin/bash
# Guidance study on the bundled style-conditional model (docs/guidance.md): for each (scale, interval) setting,
# N samples of each of the 7 WikiArt-mini styles with the caption "a STYLE painting", scored with FD / KID
# (EfficientNet-Lite0) against that style's `test` paintings (100 each; evaluate.py --real_where style=STYLE).
# Run from the repository root with nothing else on the machine; a cell whose JSON already holds this evaluation
# is kept (evaluate.py --skip_done), so an interrupted study resumes; a JSON made by another model (one retrained
# in place) stops that cell with an error: give a new OUT. Prints the table: the mean over styles, then each
# style's FD.
#
#   bash experiments/guidance_interval.sh                          # 100 samples a style, the default settings
#   N=20 SETTINGS="5:all" bash experiments/guidance_interval.sh     # a quick look
#
# Variables: N (samples a style, default 100), SETTINGS (space-separated SCALE:all or SCALE:LOW,HIGH, the latter
# guiding only where sigma is in (LOW, HIGH]; either may end in :HSCALE@SIGMA, guidance HSCALE where sigma > SIGMA,
# diffusion.py's --guidance_high; default "1:all 3:all 5:all 5:0.28,5.42 8:0.28,5.42"), STEPS (default 20), MODEL
# (default models/unet-cond), OUT (default runs/eval/guidance).
set -u
N=${N:-100}
SETTINGS=${SETTINGS:-1:all 3:all 5:all 5:0.28,5.42 8:0.28,5.42}
STEPS=${STEPS:-20}
MODEL=${MODEL:-models/unet-cond}
OUT=${OUT:-runs/eval/guidance}
STYLES=("Art Nouveau Modern" "Baroque" "Expressionism" "Impressionism" "Post-Impressionism" "Romanticism" "Symbolism")
mkdir -p "$OUT"
for setting in $SETTINGS; do
  IFS=: read -r scale interval high <<< "$setting"
  flags=(--guidance_scale "$scale")
  [ "$interval" != all ] && flags+=(--guidance_interval "${interval%,*}" "${interval#*,}")
  [ -n "$high" ] && flags+=(--guidance_high "${high%@*}" "${high#*@}")
  for style in "${STYLES[@]}"; do
    name="g${scale}_${interval}${high:+_h$high}_${style// /-}_n$N"
    python evaluate.py --samples_from "$MODEL" --prompt "a $style painting" --n "$N" --steps "$STEPS" "${flags[@]}" \
      --real ../shared/wikiart-mini --real_split test --real_where "style=$style" --resolution 128 \
      --fake "$OUT/$name" --out "$OUT/$name.json" --skip_done > "$OUT/$name.log" 2>&1
    echo "$name rc=$?: $(tail -n 1 "$OUT/$name.log")"
  done
done
python - "$OUT" "$N" "${STYLES[@]}" -- $SETTINGS <<'EOF'
import json, sys
from pathlib import Path
args = sys.argv[1:]
out, n, styles, settings = Path(args[0]), args[1], args[2:args.index("--")], args[args.index("--") + 1:]
print(f"| guidance (scale, sigma interval), {n} samples a style | mean FD | mean KID | "
      + " | ".join(styles) + " |")
print("|---" * (3 + len(styles)) + "|")
for setting in settings:
    scale, interval, *high = setting.split(":")
    cells = []
    for style in styles:
        path = out / f"g{scale}_{interval}{'_h' + high[0] if high else ''}_{style.replace(' ', '-')}_n{n}.json"
        cells.append(json.loads(path.read_text()) if path.exists() else None)
    done = [c for c in cells if c]
    mean = lambda key: sum(c[key] for c in done) / len(done) if len(done) == len(styles) else float("nan")
    where = "all" if interval == "all" else "(" + interval.replace(",", ", ") + "]"
    if high:
        where += ", {} above {}".format(*high[0].split("@"))
    print(f"| {scale}, {where} | "
          f"{mean('FD_effnet-lite0'):.1f} | {mean('KID_effnet-lite0'):.4f} | "
          + " | ".join(f"{c['FD_effnet-lite0']:.1f}" if c else "" for c in cells) + " |")
EOF
