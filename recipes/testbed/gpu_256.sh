#!/usr/bin/env bash
# The 256 x 256 testbed's GPU work (one GPU, from the repository root, the package installed):
#   bash recipes/testbed/gpu_256.sh train OUT     # photos (short side 512), train.py --size 256 -> models-256/
#   bash recipes/testbed/gpu_256.sh distill OUT   # CLEAR layers from models-256/dev -> layers-256/
#   bash recipes/testbed/gpu_256.sh transfer OUT  # SIZE=256 run_transfer.sh on the GPU -> results-256/
# OUT receives what a GPU machine hands back: the models or the layers as tar parts of 15 MB, and the logs.
# Unpack in recipes/testbed with: cat OUT/NAME.tar.part-* | tar -xf -
# DEADLINE (seconds, default 540) stops starting distillations that would not finish in one 10-minute call;
# DEVICE (default cuda) and EXTRA (more distill options, e.g. a CPU smoke run's --set train.steps=2) for trials.
set -euo pipefail
T=recipes/testbed
stage=$1 out=$2
mkdir -p "$out" && out=$(cd "$out" && pwd)  # the parts are written from recipes/testbed
pack() {  # pack NAME PATHS...: a tar of PATHS split into 15 MB parts under OUT
  local name=$1; shift
  tar -cf - "$@" | split -b 15M - "$out/$name.tar.part-"
}
case $stage in
train)
  python $T/photos.py --short-side 512 --out /tmp/photos-512.safetensors
  python $T/train.py --size 256 --photos /tmp/photos-512.safetensors --out $T/models-256 --device cuda \
    --max-minutes "${MAX_MINUTES:-1.2}" 2>&1 | tee /tmp/train.log
  grep -v "it/s]\|step/s]" /tmp/train.log > $T/models-256/train.log || true  # the progress bars' redraws left out
  cd $T && pack models-256 models-256
  ;;
distill)
  start=$SECONDS deadline=${DEADLINE:-540}
  dev=(--set 'model.teacher="recipes/testbed/models-256/dev"' --set data.height=256 --set data.width=256
       --device "${DEVICE:-cuda}")
  cn=(--set 'model.controlnet="recipes/testbed/models-256/controlnet"' --set 'data.control_images="conditions-256"')
  run() {  # run NAME SECONDS_NEEDED ARGS...: one distillation into layers-256/NAME, if it fits before the deadline
    local name=$1 need=$2; shift 2
    if [ -z "${FORCE:-}" ] && [ -f $T/layers-256/$name/clear-layers/clear_layers.safetensors ]; then
      echo "== $name: exists (FORCE=1 redoes it)"; return
    fi
    if (( SECONDS - start + need > deadline )); then echo "== $name: skipped (deadline)"; return; fi
    echo "== $name ($((SECONDS - start)) s)"
    mkdir -p $T/layers-256/$name
    clear-surgery distill --out $T/layers-256/$name --overwrite "$@" ${EXTRA:-} > /tmp/distill-$name.log 2>&1 \
      || echo "== $name FAILED"
    grep -v "it/s]\|step/s]\|sample/s]" /tmp/distill-$name.log | tee $T/layers-256/$name/distill.log | tail -3
  }
  # dev's samples made once (data.folder) for the three radii, the ControlNet pipeline's for its runs
  run r8 120 --recipe $T/distill-r8.toml "${dev[@]}" --set 'data.folder="/tmp/samples-dev"'
  run r4 90 --recipe $T/distill-r8.toml "${dev[@]}" --set 'data.folder="/tmp/samples-dev"' --set clear.radius=4
  run r16 90 --recipe $T/distill-r8.toml "${dev[@]}" --set 'data.folder="/tmp/samples-dev"' --set clear.radius=16
  run r8-controlnet 120 --recipe $T/distill-r8-controlnet.toml "${dev[@]}" "${cn[@]}" \
    --set 'data.folder="/tmp/samples-cn"'
  run r8-controlnet-trained 100 --recipe $T/distill-r8-controlnet.toml "${dev[@]}" "${cn[@]}" \
    --set 'data.folder="/tmp/samples-cn"' --controlnet-attention trained
  run r8-controlnet-half 100 --recipe $T/distill-r8-controlnet.toml "${dev[@]}" "${cn[@]}" \
    --set 'data.folder="/tmp/samples-cn"' --set model.controlnet_share=0.5
  run r4-controlnet 90 --recipe $T/distill-r8-controlnet.toml "${dev[@]}" "${cn[@]}" \
    --set 'data.folder="/tmp/samples-cn"' --set clear.radius=4
  run r16-controlnet 90 --recipe $T/distill-r8-controlnet.toml "${dev[@]}" "${cn[@]}" \
    --set 'data.folder="/tmp/samples-cn"' --set clear.radius=16
  cd $T && pack layers-256 $(find layers-256 -name clear-layers\* -o -name metrics.png -o -name metrics.jsonl \
    -o -name distill.log -o -name recipe.json | grep -v checkpoints)
  ;;
transfer)
  SIZE=256 DEVICE=cuda JOBS=${JOBS:-6} bash $T/run_transfer.sh
  cd $T && pack results-256 results-256/README.md results-256/summary.json \
    $(find results-256 -name metrics.json -o -name report.md)
  pack results-256-grids $(find results-256 -name grid.png)  # larger: apart, so the numbers come back first
  ;;
*) echo "usage: $0 train|distill|transfer OUT" >&2; exit 2 ;;
esac
