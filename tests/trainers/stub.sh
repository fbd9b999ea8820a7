#!/usr/bin/env bash
# Stub trainer for the end-to-end tests (tests/e2e.rs).
#
# The daemon clears a trainer's environment, so the test steers this script through the
# job itself: MODEL is a command word.
#   ok             print the job's environment and succeed (any unknown model does the same)
#   sleep:N        run for N seconds, then succeed; SIGTERM ends it at once (exit 143)
#   fail:N         print two lines and exit with status N
#   hang:N         ignore SIGTERM and run for N seconds (only SIGKILL stops it early)
#   spawn:N        start a grandchild (`sleep 300`) of its own, then run for N seconds
#   once/CMD       CMD on the job's first run, `ok` on every later run
# A file <records>/<job id>.hold holds the trainer after its start until the test removes it,
# whatever the model (the seed's job has a real model name, which runs as `ok`).
#
# What it did goes to <data dir>/../trainer-records/events, one line per event:
# "<start|end|term|child|overlap> <job id> <attempt> <pid>", where the test reads it.
# While it runs, it holds an exclusive lock on <records>/<job id>.lock; a trainer that finds
# the lock taken (another trainer of the same job still alive, in any data dir of the
# sandbox) records `overlap` before its start. The lock goes with the process, however it
# ends, so this holds after a SIGKILL too; the commands it starts do not inherit it.
set -u

records="${TW_DATA_DIR}/../trainer-records"
mkdir -p "$records"
note() { printf '%s %s %s %s\n' "$1" "$JOB_ID" "$ATTEMPT" "${2:-$$}" >>"$records/events"; }
# Sleep in the background and wait, so that SIGTERM interrupts the wait at once.
nap() { sleep "$1" 9>&- & wait $!; }

command="$MODEL"
if [[ $command == once/* ]]; then
  if [[ -e "$records/$JOB_ID.ran" ]]; then command=ok; else command="${command#once/}"; fi
fi
: >"$records/$JOB_ID.ran"

trap 'note term; echo "got SIGTERM; stopping"; exit 143' TERM
exec 9>>"$records/$JOB_ID.lock"
flock -n 9 || note overlap
note start

echo "hello from $JOB_ID attempt=$ATTEMPT type=$JOB_TYPE model=$MODEL"
echo "DATASET=$DATASET FILE_FORMAT=$FILE_FORMAT DATASET_ZIP=$DATASET_ZIP MODEL_TYPE=$MODEL_TYPE EXPECTED_REPO_NAME=$EXPECTED_REPO_NAME"
echo "DATASET_TYPE=$DATASET_TYPE"
echo "job file says $(grep -o '"status": *"[A-Za-z]*"' "$JOB_FILE" | tr -d ' ')"

while [[ -e "$records/$JOB_ID.hold" ]]; do nap 0.05; done

case "$command" in
  sleep:*)
    nap "${command#sleep:}"
    ;;
  fail:*)
    echo "step 1 of 2 done"
    echo "fatal: CUDA out of memory (stub)"
    note end
    exit "${command#fail:}"
    ;;
  hang:*)
    trap '' TERM
    echo "ignoring SIGTERM"
    nap "${command#hang:}"
    ;;
  spawn:*)
    sleep 300 9>&- &
    note child $!
    nap "${command#spawn:}"
    ;;
esac

echo "training finished"
note end
