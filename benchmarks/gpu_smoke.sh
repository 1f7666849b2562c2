#!/usr/bin/env bash
# The GPU smoke run: one prepared script for a lent GPU machine, under 10 minutes.
#
#   bash benchmarks/gpu_smoke.sh            # install (OR1_GPU=1), build, run, report
#   SKIP_INSTALL=1 bash benchmarks/gpu_smoke.sh
#   SKIP_INSTALL=1 LAYERS=2 STEPS=2 RESPONSE=32 PROMPTS=4 bash benchmarks/gpu_smoke.sh  # dry run on CPU
#
# 1. installs or1 with OR1_GPU=1 (torch 2.13 CUDA build, vLLM, DeepSpeed) into ./.venv;
# 2. writes a Qwen2.5-0.5B-shape model with random weights (`or1 make-model`, nothing downloaded);
# 3. `or1 run` on it: one learner rank, 2 actors (vLLM, bf16, in-flight weight updates), one reward
#    worker, STEPS optimizer steps on toy:addition. `or1 run` places the roles on the GPUs
#    (deploy/placement.py: on one GPU all three share it, vLLM taking at most 0.4 of it in all);
#    a random model earns no reward, so zero-advantage groups are trained (keep_zero_advantage) and
#    each step is a real forward, backward and AdamW step;
# 4. benchmarks/gpu_report.py: generation tokens/s per actor against vLLM's own offline
#    throughput on the same prompts, learner MFU, weight-sync seconds per GB over ZMQ (the path
#    or1 uses between hosts) and a raw NCCL broadcast of the same bytes (with 2+ GPUs).
# Everything lands in $WORK (default /tmp/or1-gpu-smoke); the last line is the RESULT line.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${WORK:-/tmp/or1-gpu-smoke}"
STEPS="${STEPS:-8}"
LIKE="${LIKE:-qwen2.5-0.5b}"
LAYERS="${LAYERS:-}"        # fewer decoder layers (for a dry run on CPU, below)
RESPONSE="${RESPONSE:-256}"  # max_response_tokens
PROMPTS="${PROMPTS:-16}"     # prompts per batch (8 samples each)
mkdir -p "$WORK"
t0=$(date +%s)
if [ "${SKIP_INSTALL:-0}" != "1" ]; then
  OR1_GPU=1 bash scripts/install.sh
fi
nvidia-smi -L || true
[ -d "$WORK/model" ] || .venv/bin/or1 make-model --like "$LIKE" ${LAYERS:+--layers "$LAYERS"} "$WORK/model"
rm -rf "$WORK/run"
timeout 420 .venv/bin/or1 run --model "$WORK/model" --engine vllm --out "$WORK/run" \
  --set run.actors=2 --set run.learner_ranks=1 --set run.reward_workers=1 \
  --set actor.update_mode=in_flight --set actor.threads=0 --set actor.max_model_len=1024 \
  --set learner.max_staleness=1 --set learner.stop_at_reward=1.0 \
  --set "learner.stages=[{steps=$STEPS, max_response_tokens=$RESPONSE, prompts_per_batch=$PROMPTS, group_size=8}]" \
  --set learner.loss.keep_zero_advantage=true --set learner.trainer.precision=bf16 \
  --set learner.data.source=toy:addition --set learner.checkpoint_every=0 \
  | tee "$WORK/run.out"
echo "or1 gpu smoke: run finished after $(( $(date +%s) - t0 )) s"
.venv/bin/python benchmarks/gpu_report.py --run "$WORK/run" --model "$WORK/model" | tee "$WORK/report.out"
echo "or1 gpu smoke: done in $(( $(date +%s) - t0 )) s"
