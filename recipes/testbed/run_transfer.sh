#!/usr/bin/env bash
# The transfer checks of recipes/testbed/results: zero-shot CLEAR vs CLEAR layers distilled on "dev",
# on dev, on schnell (transfer) and on dev + ControlNet, at r = 8 (the profile's recommendation for
# dev) and r = 4. 16 images each (one per caption), seed 0. CPU, about half an hour. From the
# repository root:  bash recipes/testbed/run_transfer.sh
set -euo pipefail
T=recipes/testbed
R=$T/results
common=(--prompts $T/prompts.txt --num-images 16 --seed 0 --height 64 --width 64 --overwrite)
for r in 8 4; do
  for mode in zero-shot distilled; do
    if [ $mode = zero-shot ]; then clear=(--radius $r); else clear=(--clear-layers $T/layers/r$r); fi
    clear-surgery check-transfer --target $T/models/dev "${clear[@]}" --steps 28 --guidance 3.5 "${common[@]}" \
      --out $R/dev-$mode-r$r
    clear-surgery check-transfer --target $T/models/schnell "${clear[@]}" --steps 4 "${common[@]}" \
      --out $R/schnell-$mode-r$r
    clear-surgery check-transfer --target $T/models/dev "${clear[@]}" --steps 28 --guidance 3.5 "${common[@]}" \
      --controlnet $T/models/controlnet --control-images $T/conditions --out $R/controlnet-$mode-r$r
  done
done
python $T/summarize.py $R
