#!/usr/bin/env bash
# The transfer checks of recipes/testbed/results (64 x 64) and results-256 (256 x 256): zero-shot CLEAR vs
# CLEAR layers distilled on "dev", on dev, on schnell (transfer) and on dev + ControlNet. 16 images each (one
# per caption), seed 0; dev and ControlNet 28 steps at guidance 3.5, schnell 4 steps. From the repository root:
#   bash recipes/testbed/run_transfer.sh                 64 x 64, r = 8 and 4 (CPU, about 45 minutes)
#   SIZE=256 bash recipes/testbed/run_transfer.sh        256 x 256, r = 8, 4 and 16 (a GPU: a few minutes)
# FORCE=1 redoes reports that exist; DEVICE=cuda|cpu picks the device; JOBS=N runs N checks at once;
# RADII and NUM_IMAGES narrow a trial run.
set -euo pipefail
T=recipes/testbed
SIZE=${SIZE:-64}
if [ "$SIZE" = 256 ]; then  # distill writes OUT/clear-layers (and OUT/clear-layers-controlnet)
  M=$T/models-256 L=$T/layers-256 R=$T/results-256 C=$T/conditions-256 radii="8 4 16"
  layers() { echo "$L/$1/clear-layers"; }
  cn_layers() { echo "$L/$1/clear-layers-controlnet"; }
else  # the committed 64 x 64 layers: model/ and controlnet/ for the ControlNet-trained runs
  M=$T/models L=$T/layers R=$T/results C=$T/conditions radii="8 4"
  layers() { if [ -d "$L/$1/model" ]; then echo "$L/$1/model"; else echo "$L/$1"; fi; }
  cn_layers() { echo "$L/$1/controlnet"; }
fi
RADII=${RADII:-$radii}
# the dense images of each pipeline are made once and shared by its checks (--dense-cache)
common=(--prompts $T/prompts.txt --num-images ${NUM_IMAGES:-16} --seed 0 --height $SIZE --width $SIZE --overwrite
        --dense-cache "${DENSE_CACHE:-/tmp/clear-surgery-dense-$SIZE}")
[ -n "${DEVICE:-}" ] && common+=(--device "$DEVICE")
dev=(--target $M/dev --steps 28 --guidance 3.5)
schnell=(--target $M/schnell --steps 4)
cn=(--controlnet $M/controlnet --control-images $C)
check() {  # check NAME ARGS...: one report folder (in the background with JOBS > 1)
  local name=$1; shift
  if [ -z "${FORCE:-}" ] && [ -f "$R/$name/metrics.json" ]; then echo "$name: exists"; return; fi
  if (( ${JOBS:-1} > 1 )); then
    while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n || true; done
    { clear-surgery check-transfer "$@" "${common[@]}" --out "$R/$name" > "/tmp/check-$name.log" 2>&1 \
        && echo "== $name: $(tail -2 /tmp/check-$name.log | head -1)" \
        || { echo "== $name FAILED:"; tail -5 "/tmp/check-$name.log"; }; } &
  else
    echo "== $name"; clear-surgery check-transfer "$@" "${common[@]}" --out "$R/$name"
  fi
}
for r in $RADII; do
  zs=(--radius $r); dist=(--clear-layers "$(layers r$r)")
  [ -d "$(layers r$r)" ] || { echo "r$r: no layers in $(layers r$r)"; continue; }
  check dev-zero-shot-r$r "${dev[@]}" "${zs[@]}"
  check dev-distilled-r$r "${dev[@]}" "${dist[@]}"
  # schnell: its attention weights moved away from dev's in its own training; replace puts dev's
  # (healed) tensors in their place, delta adds what distillation changed to schnell's own
  check schnell-zero-shot-r$r "${schnell[@]}" "${zs[@]}"
  check schnell-distilled-r$r "${schnell[@]}" "${dist[@]}" --layers-mode replace
  check schnell-distilled-delta-r$r "${schnell[@]}" "${dist[@]}" --layers-mode delta
  # ControlNet: its own attention zero-shot CLEAR (both sides), or with the layers' changes on the two
  # blocks it copied from dev, or dense (both sides: only the transformer's layers differ)
  check controlnet-zero-shot-r$r "${dev[@]}" "${cn[@]}" "${zs[@]}" --controlnet-attention clear
  check controlnet-distilled-r$r "${dev[@]}" "${cn[@]}" "${dist[@]}" --controlnet-attention clear
  check controlnet-distilled-layers-r$r "${dev[@]}" "${cn[@]}" "${dist[@]}" --controlnet-attention layers
  check controlnet-dense-zero-shot-r$r "${dev[@]}" "${cn[@]}" "${zs[@]}" --controlnet-attention dense
  check controlnet-dense-distilled-r$r "${dev[@]}" "${cn[@]}" "${dist[@]}" --controlnet-attention dense
  # layers healed with the ControlNet in the loop (distill-r8-controlnet.toml; r4: --set clear.radius=4) and
  # with it on half of the batches (--set model.controlnet_share=0.5): in the ControlNet pipeline and on dev
  for kind in controlnet controlnet-half; do
    folder=$(layers r$r-$kind); [ -d "$folder" ] || continue
    name=$([ $kind = controlnet ] && echo cnloop || echo cnhalf)
    check controlnet-dense-$name-r$r "${dev[@]}" "${cn[@]}" --clear-layers "$folder" --controlnet-attention dense
    check dev-$name-r$r "${dev[@]}" --clear-layers "$folder"
  done
  # the ControlNet's attention CLEAR and trained with the layers (--controlnet-attention trained): its own layers
  folder=$(layers r$r-controlnet-trained)
  if [ -d "$folder" ]; then
    check controlnet-cntrained-r$r "${dev[@]}" "${cn[@]}" --clear-layers "$folder" \
      --controlnet-layers "$(cn_layers r$r-controlnet-trained)"
    check dev-cntrained-r$r "${dev[@]}" --clear-layers "$folder"
  fi
done
wait
mkdir -p $R
python $T/summarize.py $R
