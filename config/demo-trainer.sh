#!/usr/bin/env bash
# A stand-in trainer so that `training-worker serve` works out of the box: it prints what it
# was asked to train, then progress for a few seconds, and stops cleanly on SIGTERM.
# Replace [executor] command with the real trainer; it receives the same environment.
set -u

steps="${DEMO_TRAINER_STEPS:-5}"
stopping=0
trap 'stopping=1' TERM INT

echo "demo trainer: job ${JOB_ID} (${JOB_TYPE}), attempt ${ATTEMPT}"
echo "model: ${MODEL}"
if [ "${JOB_TYPE}" = "TextJob" ]; then
  echo "dataset: ${DATASET} (${FILE_FORMAT})"
else
  echo "dataset zip: ${DATASET_ZIP} (${MODEL_TYPE})"
fi

for step in $(seq 1 "$steps"); do
  # Sleep in the background and wait, so that SIGTERM interrupts the wait at once.
  sleep 1 &
  wait $!
  if [ "$stopping" = 1 ]; then
    echo "received SIGTERM at step ${step}/${steps}; stopping"
    exit 143
  fi
  echo "step ${step}/${steps}: loss $(awk "BEGIN { printf \"%.3f\", 2.0 / ${step} }")"
done

echo "training finished; would upload to ${EXPECTED_REPO_NAME:-<no repo name>}"
