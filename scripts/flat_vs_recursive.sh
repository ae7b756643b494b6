#!/usr/bin/env bash
# The paper's comparison at one equal budget: a recursive model and the flat (GReaT-style) baseline, trained from
# scratch with the same code, preset, steps, batch and block size, then scored side by side by `otel-tracegen eval`
# (with the replay and probabilistic baselines) and by free-running samples (no grammar).
#
#   scripts/flat_vs_recursive.sh CORPUS OUT [CONFIG] [STEPS] [BATCH]
#
# Defaults: mini, 500 steps, batch 16 (8.2M tokens each; ~25 min per model on 2 CPU cores). On a GPU use the
# shipped model's budget instead: small 3000 64 (scripts/train_default_model.sh CORPUS OUT pretrain flat fidelity).
# OUT gets rec/ and flat/ (the models), report.{html,md} (+ report_figures/), metrics.json, free_running.json and
# a log of each step. docs/evaluation.md ("Recursive against flat at one budget") has the figures of a run.
# N (default 200) sets the free and conditioned requests, N_INSTRUCTIONS (default 20) those per instruction.
set -euo pipefail
corpus=${1:?usage: $0 CORPUS OUT [CONFIG] [STEPS] [BATCH]}
out=${2:?usage: $0 CORPUS OUT [CONFIG] [STEPS] [BATCH]}
config=${3:-mini}
steps=${4:-500}
batch=${5:-16}
mkdir -p "$out"
tg() { python3 -m otel_tracegen "$@"; }
budget=(--config "$config" --max-steps "$steps" --batch-size "$batch" --eval-every 100 --text-passes 3 --seed 0)
tg train --stage pretrain --corpus "$corpus" --out "$out/rec" "${budget[@]}" 2>&1 | tee "$out/train_rec.log"
tg train --stage flat --corpus "$corpus" --out "$out/flat" "${budget[@]}" 2>&1 | tee "$out/train_flat.log"
tg eval --real "$corpus" --model "$out/rec" --baseline flat --flat-model "$out/flat" --baseline replay \
  --baseline probabilistic --n "${N:-200}" --n-instructions "${N_INSTRUCTIONS:-20}" --seed 0 --report "$out/report.html" \
  --json "$out/metrics.json" 2>&1 | tee "$out/eval.log"
python3 -m otel_tracegen.lm.sample "$out/rec" --n "${N:-200}" --seed 0 --compare "$corpus" \
  --json "$out/free_running.json" 2>&1 | tee "$out/free_running.log"
