#!/usr/bin/env bash
# Train the shipped default model (model/README.md, "Reproduce") on one GPU, stage by stage.
#
#   scripts/train_default_model.sh CORPUS OUT [STAGE ...]
#
# CORPUS: a corpus directory, e.g. from
#   otel-tracegen data build --format spancsv ../shared/datasets/nezha-trainticket/traces --out tt
#   otel-tracegen data build --format spancsv ../shared/datasets/nezha-onlineboutique/traces --out ob
#   otel-tracegen data join tt ob --out ttob --model-view
# STAGE: any of pretrain instruct infill sample flat fidelity (default: the first four, in that order); flat trains
# the paper's GReaT-style baseline with the pretrain budget into OUT-flat, fidelity runs benchmarks/fidelity.py on
# OUT (and OUT-flat when it exists) and writes OUT/fidelity.{html,md,json}. Naming stages lets a machine
# with a per-command time limit run one at a time; each stage reads what the one before wrote to OUT.
# Set EXTRA="--pack-order corpus" to reproduce the model shipped on 2026-11-23 exactly.
set -euo pipefail
corpus=${1:?usage: $0 CORPUS OUT [STAGE ...]}
out=${2:?usage: $0 CORPUS OUT [STAGE ...]}
shift 2
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(pretrain instruct infill sample)
tg() { python3 -m otel_tracegen "$@"; }
for stage in "${stages[@]}"; do
  case $stage in
    pretrain) tg train --stage pretrain --corpus "$corpus" --out "$out" --config small --max-steps 3000 \
                --batch-size 64 --eval-every 500 --text-passes 3 ${EXTRA:-} ;;
    instruct) tg train --stage instruct --corpus "$corpus" --out "$out" --max-steps 800 --batch-size 64 \
                --eval-every 200 --instruct-plain-prob 0.5 ;;
    infill)   tg train --stage infill --corpus "$corpus" --out "$out" --max-steps 600 --batch-size 64 \
                --eval-every 200 ;;
    sample)   for adapter in none instruct; do
                args=(); [ "$adapter" = none ] || args=(--adapter "$adapter")
                python3 -m otel_tracegen.lm.sample "$out" --n 200 --seed 0 "${args[@]}" --compare "$corpus" \
                  --json "$out/free_running_$adapter.json"
              done ;;
    flat)     tg train --stage flat --corpus "$corpus" --out "$out-flat" --config small --max-steps 3000 \
                --batch-size 64 --eval-every 500 --text-passes 3 ;;
    fidelity) flat=(); [ -d "$out-flat" ] && flat=(--flat-model "$out-flat")
              python3 benchmarks/fidelity.py --corpus "$corpus" --model "$out" "${flat[@]}" \
                --report "$out/fidelity.html" --json "$out/fidelity.json" ;;
    *) echo "$0: unknown stage '$stage' (pretrain, instruct, infill, sample, flat, fidelity)" >&2; exit 2 ;;
  esac
done
