#!/usr/bin/env bash
# Train the synthesis step with verl on a Ray cluster, as in the PaCoRe report:
#   stage 1 (~250 iterations) on problems whose message accuracy is in (0, 9/24),
#   stage 2 (~450 iterations) on problems the stage-1 policy synthesizes sometimes but not always right.
#
# Usage (on the Ray head node, with verl and pacore installed):
#   MODEL=/models/Qwen3-8B-Base STAGE1_DATA=data/stage1.parquet ./run_pacore_synthesis.sh stage1
#   MODEL=/ckpt/stage1-hf      STAGE2_DATA=data/stage2.parquet ./run_pacore_synthesis.sh stage2
# Extra arguments are passed to verl as Hydra overrides, e.g. trainer.nnodes=4 trainer.n_gpus_per_node=8.
# Process-aware reward instead of the outcome reward (the verifier is any backend pacore can call):
#   ... ./run_pacore_synthesis.sh stage1 +reward.custom_reward_function.reward_kwargs.verifier=http://judge:8000/v1
# Between the stages, see docs/train.md: merge the stage-1 checkpoint to a Hugging Face model, serve
# it, measure synthesis success with 'pacore run --repeats', and export stage 2 with --synthesis-acc.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STAGE="${1:?usage: run_pacore_synthesis.sh stage1|stage2 [hydra overrides...]}"
shift
MODEL="${MODEL:?set MODEL to the policy to train (a Hugging Face model directory)}"
REWARDS="$(python -c 'import pacore.rewards as r; print(r.__file__)')"

case "$STAGE" in
  stage1) DATA="${STAGE1_DATA:?set STAGE1_DATA (pacore export-train --format verl)}"; STEPS=250 ;;
  stage2) DATA="${STAGE2_DATA:?set STAGE2_DATA (pacore export-train --format verl --synthesis-acc 0..1)}"; STEPS=450 ;;
  *) echo "run_pacore_synthesis.sh: unknown stage '$STAGE' (stage1 or stage2)" >&2; exit 2 ;;
esac

exec python -m verl.trainer.main_ppo \
  --config-path "$HERE/config" --config-name pacore_synthesis \
  actor_rollout_ref.model.path="$MODEL" \
  critic.model.path="$MODEL" \
  data.train_files="$DATA" \
  data.val_files="$DATA" \
  reward.custom_reward_function.path="$REWARDS" \
  trainer.experiment_name="$STAGE" \
  trainer.total_training_steps="$STEPS" \
  "$@"
