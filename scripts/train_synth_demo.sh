#!/usr/bin/env bash
# The recipe of the shipped demo model (models/synth/), stage by stage, on 2 GPUs (one run per GPU):
#   bash scripts/train_synth_demo.sh ar       # stage 1 with error recycling (GPU 0) and without it (GPU 1);
#                                             # clips are rendered in memory (data.dataset_type procedural)
#   bash scripts/train_synth_demo.sh data     # a `data synth` folder (12 processes in parallel) for the DMD prompts
#   bash scripts/train_synth_demo.sh dmd      # stage 2 from the stage-1 EMA weights: 4 steps (GPU 0), 2 steps (GPU 1)
#   bash scripts/train_synth_demo.sh export   # models/synth/{ar,ar_noer,dmd4,dmd2}.safetensors (LoRA merged)
# Every run is bounded by training.max_minutes; the steps reached are in each run's log and manifest.
set -euo pipefail
stage=${1:?usage: train_synth_demo.sh data|ar|dmd|export [field=value ...]}
shift
DATA=${DATA:-data/synth}
RUNS=${RUNS:-runs}
MODELS=${MODELS:-models/synth}
PARTS=${PARTS:-12}
PER_PART=${PER_PART:-50}

latest() {  # newest checkpoint folder of a run
  ls -d "$1"/checkpoint_* | sort | tail -n 1
}

case "$stage" in
data)
  # sample i of part p is sample i of `longlive data synth --seed 1000+p`: deterministic, made in parallel
  rm -rf "$DATA" "$DATA.parts" && mkdir -p "$DATA/video" "$DATA/caption" "$DATA.parts"
  for p in $(seq 0 $((PARTS - 1))); do
    longlive data synth --out "$DATA.parts/$p" --samples "$PER_PART" --seed $((1000 + p)) --frames 97 \
      --eval-prompts 0 > "$DATA.parts/$p.log" 2>&1 &
  done
  wait
  for p in $(seq 0 $((PARTS - 1))); do
    for s in "$DATA.parts/$p"/video/*; do
      name=$(basename "$s")
      mv "$s" "$DATA/video/p${p}_$name"
      mv "$DATA.parts/$p/caption/$name" "$DATA/caption/p${p}_$name"
    done
  done
  cp "$DATA.parts/0/synth.json" "$DATA/synth.json"
  rm -rf "$DATA.parts"
  echo "dataset: $(ls "$DATA/video" | wc -l) samples, $(find "$DATA/video" -name '*.mp4' | wc -l) shots in $DATA"
  ;;
ar)
  # (re-running resumes each run from its newest checkpoint for another training.max_minutes)
  # 8 CPU threads each: the error-recycling run otherwise takes every core and starves the other one
  OMP_NUM_THREADS=8 CUDA_VISIBLE_DEVICES=0 longlive train --config configs/synth/train_ar.yaml --logdir "$RUNS/ar" \
    "$@" >> "$RUNS.ar.log" 2>&1 &
  OMP_NUM_THREADS=8 CUDA_VISIBLE_DEVICES=1 longlive train --config configs/synth/train_ar.yaml --logdir "$RUNS/ar_noer" \
    training.error_recycling.enabled=false "$@" >> "$RUNS.ar_noer.log" 2>&1 &
  wait
  ;;
dmd)
  [ -d "$DATA/caption" ] || bash "$0" data
  AR=$(latest "$RUNS/${AR_RUN:-ar}")/generator_ema.safetensors
  base="checkpoints.generator_ckpt=$AR checkpoints.real_score_ckpt=$AR checkpoints.fake_score_ckpt=$AR data.data_path=$DATA"
  CUDA_VISIBLE_DEVICES=0 longlive train --config configs/synth/train_dmd.yaml --logdir "$RUNS/dmd4" $base \
    inference.sampling_steps=4 "$@" > "$RUNS.dmd4.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=1 longlive train --config configs/synth/train_dmd.yaml --logdir "$RUNS/dmd2" $base \
    inference.sampling_steps=2 "$@" > "$RUNS.dmd2.log" 2>&1 &
  wait
  ;;
export)
  mkdir -p "$MODELS"
  cp "$(latest "$RUNS/ar")/generator_ema.safetensors" "$MODELS/ar.safetensors"
  cp "$(latest "$RUNS/ar_noer")/generator_ema.safetensors" "$MODELS/ar_noer.safetensors"
  for steps in 4 2; do
    longlive export merge-lora --config configs/synth/train_dmd.yaml --generator-ckpt "$MODELS/ar.safetensors" \
      --lora-ckpt "$(latest "$RUNS/dmd$steps")/lora.pt" --output-path "$MODELS/dmd$steps.safetensors"
  done
  ls -la "$MODELS"
  ;;
*)
  echo "unknown stage $stage (data|ar|dmd|export)" >&2; exit 2 ;;
esac
