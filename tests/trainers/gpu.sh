#!/usr/bin/env bash
# A stub trainer for the GPU tests. It records, one line each, when it starts and ends and
# which GPUs it was given, in "<sandbox>/gpu-records":
#   start|end <job_id> <CUDA_VISIBLE_DEVICES or "unset"> <nanoseconds since the epoch>
# It runs while "<sandbox>/hold-<job_id>" exists, then for MODEL's "sleep:N" seconds.
set -u
sandbox="$(dirname "$TW_DATA_DIR")"
records="$sandbox/gpu-records"
gpus="${CUDA_VISIBLE_DEVICES-unset}"
echo "start $JOB_ID $gpus $(date +%s%N)" >> "$records"
trap 'echo "end $JOB_ID $gpus $(date +%s%N)" >> "$records"; exit 143' TERM
while [ -e "$sandbox/hold-$JOB_ID" ]; do
  sleep 0.05 &
  wait $!
done
case "$MODEL" in
  sleep:*) sleep "${MODEL#sleep:}" & wait $! ;;
esac
echo "end $JOB_ID $gpus $(date +%s%N)" >> "$records"
