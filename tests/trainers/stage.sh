#!/usr/bin/env bash
# A stub pipeline stage for the stage tests (tests/stages.rs). Every configured stage runs
# this script (or the single executor.command does); the test's config passes placeholders
# as arguments.
#
# It records, one line each, in "<sandbox>/stage-records":
#   start|end|term <$STAGE> <$JOB_ID> <$ATTEMPT> <pid>
# (term: it got SIGTERM and stops), and its argv, one argument a line, in
# "<sandbox>/argv-<job id>-<stage>-<attempt>".
#
# The test steers it through files in the sandbox:
#   hold-<job id>-<stage>   the stage waits after its start while this file exists
#   fail-<job id>-<stage>   the stage prints two lines and exits with the status in the file
#   print-<job id>-<stage>  the stage prints this file's contents after its start
set -u
# The single executor.command gets no STAGE; it records as the stage "command".
: "${STAGE:=command}"

sandbox="$(dirname "$TW_DATA_DIR")"
records="$sandbox/stage-records"
note() { printf '%s %s %s %s %s\n' "$1" "$STAGE" "$JOB_ID" "$ATTEMPT" "$$" >>"$records"; }

printf '%s\n' "$@" >"$sandbox/argv-$JOB_ID-$STAGE-$ATTEMPT"
trap 'note term; echo "$STAGE got SIGTERM; stopping"; exit 143' TERM
# Printed before the start is noted, so that a test that saw the start finds it in the log.
echo "$STAGE: working on $JOB_ID (attempt $ATTEMPT)"
note start
if [[ -e "$sandbox/print-$JOB_ID-$STAGE" ]]; then
  cat "$sandbox/print-$JOB_ID-$STAGE"
fi

while [[ -e "$sandbox/hold-$JOB_ID-$STAGE" ]]; do
  # In the background, so that SIGTERM interrupts the wait at once.
  sleep 0.05 &
  wait $!
done

if [[ -e "$sandbox/fail-$JOB_ID-$STAGE" ]]; then
  status="$(cat "$sandbox/fail-$JOB_ID-$STAGE")"
  echo "$STAGE: half done"
  echo "fatal: $STAGE ran out of disk (stub)"
  note end
  exit "$status"
fi

echo "$STAGE: done"
note end
