#!/usr/bin/env bash
# The transfer checks of recipes/testbed/results: zero-shot CLEAR vs CLEAR layers distilled on "dev",
# on dev, on schnell (transfer) and on dev + ControlNet, at r = 8 (the profile's recommendation for
# dev) and r = 4. 16 images each (one per caption), seed 0; dev and ControlNet 28 steps at guidance
# 3.5, schnell 4 steps. CPU, about 45 minutes. From the repository root:
#   bash recipes/testbed/run_transfer.sh          (FORCE=1 redoes reports that exist)
set -euo pipefail
T=recipes/testbed
R=$T/results
common=(--prompts $T/prompts.txt --num-images 16 --seed 0 --height 64 --width 64 --overwrite)
dev=(--target $T/models/dev --steps 28 --guidance 3.5)
schnell=(--target $T/models/schnell --steps 4)
cn=(--controlnet $T/models/controlnet --control-images $T/conditions)
check() {  # check NAME ARGS...: one report folder
  local name=$1; shift
  if [ -z "${FORCE:-}" ] && [ -f "$R/$name/metrics.json" ]; then echo "$name: exists"; return; fi
  echo "== $name"; clear-surgery check-transfer "$@" "${common[@]}" --out "$R/$name"
}
for r in 8 4; do
  zs=(--radius $r); layers=(--clear-layers $T/layers/r$r)
  check dev-zero-shot-r$r "${dev[@]}" "${zs[@]}"
  check dev-distilled-r$r "${dev[@]}" "${layers[@]}"
  # schnell: its attention weights moved away from dev's in its own training; replace puts dev's
  # (healed) tensors in their place, delta adds what distillation changed to schnell's own
  check schnell-zero-shot-r$r "${schnell[@]}" "${zs[@]}"
  check schnell-distilled-r$r "${schnell[@]}" "${layers[@]}" --layers-mode replace
  check schnell-distilled-delta-r$r "${schnell[@]}" "${layers[@]}" --layers-mode delta
  # ControlNet: its own attention zero-shot CLEAR (both sides), or with the layers' changes on the two
  # blocks it copied from dev, or dense (both sides: only the transformer's layers differ)
  check controlnet-zero-shot-r$r "${dev[@]}" "${cn[@]}" "${zs[@]}" --controlnet-attention clear
  check controlnet-distilled-r$r "${dev[@]}" "${cn[@]}" "${layers[@]}" --controlnet-attention clear
  check controlnet-distilled-layers-r$r "${dev[@]}" "${cn[@]}" "${layers[@]}" --controlnet-attention layers
  check controlnet-dense-zero-shot-r$r "${dev[@]}" "${cn[@]}" "${zs[@]}" --controlnet-attention dense
  check controlnet-dense-distilled-r$r "${dev[@]}" "${cn[@]}" "${layers[@]}" --controlnet-attention dense
  # layers healed with the ControlNet in the loop (distill-r8-controlnet.toml; r4: --set clear.radius=4) and
  # with it on half of the batches (--set model.controlnet_share=0.5): in the ControlNet pipeline and on dev
  for kind in controlnet controlnet-half; do
    folder=$T/layers/r$r-$kind; [ -d "$folder" ] || continue
    name=$([ $kind = controlnet ] && echo cnloop || echo cnhalf)
    check controlnet-dense-$name-r$r "${dev[@]}" "${cn[@]}" --clear-layers "$folder" --controlnet-attention dense
    check dev-$name-r$r "${dev[@]}" --clear-layers "$folder"
  done
  # the ControlNet's attention CLEAR and trained with the layers (--controlnet-attention trained): its own layers
  folder=$T/layers/r$r-controlnet-trained
  if [ -d "$folder" ]; then
    check controlnet-cntrained-r$r "${dev[@]}" "${cn[@]}" --clear-layers "$folder/model" --controlnet-layers "$folder/controlnet"
    check dev-cntrained-r$r "${dev[@]}" --clear-layers "$folder/model"
  fi
done
python $T/summarize.py $R
