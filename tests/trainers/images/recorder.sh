#!/usr/bin/env bash
# A fake container image for the docker-stage tests (tests/docker.rs). The fake docker CLI
# (tests/support/fake-docker) runs it as a container's main process, with exactly the
# container's `-e` variables and PATH; the test installs it as each image it needs.
#
# It records, one line each, in $RECORDS (default: "records" two levels above the image
# file, that is beside the fake's state dir in the sandbox):
#   start|end|term <$STAGE> <$JOB_ID> <$ATTEMPT> <pid> <microseconds since the epoch>
# (term: it got SIGTERM and stops), and beside that file:
#   argv-<job>-<stage>-<attempt>   its arguments, one a line
#   env-<job>-<stage>-<attempt>    the names of its environment variables, sorted
#   token-<job>-<stage>-<attempt>  HUGGINGFACE_TOKEN in rot13, when it has one (so that the
#                                  secret itself is in no file)
#
# The test steers it through files beside $RECORDS:
#   hold-<job>-<stage>   it waits after its start while this file exists
#   tick-<job>-<stage>   while held, it prints "<stage>: tick N" about every 0.2 s
#   fail-<job>-<stage>   it exits with the status in the file
# and a job whose model is "sleep:N" runs N more seconds before its end.
set -u

records=${RECORDS:-$(dirname "$0")/../../records}
dir=$(dirname "$records")
stage=${STAGE:-none}
job=${JOB_ID:-none}
attempt=${ATTEMPT:-0}
now() { printf '%s' "${EPOCHREALTIME//[.,]/}"; }
note() { printf '%s %s %s %s %s %s\n' "$1" "$stage" "$job" "$attempt" "$$" "$(now)" >>"$records"; }

printf '%s\n' "$@" >"$dir/argv-$job-$stage-$attempt"
compgen -e | grep -vxE 'PWD|OLDPWD|SHLVL|_' | sort >"$dir/env-$job-$stage-$attempt"
if [[ -v HUGGINGFACE_TOKEN ]]; then
  printf '%s' "$HUGGINGFACE_TOKEN" | tr 'A-Za-z' 'N-ZA-Mn-za-m' >"$dir/token-$job-$stage-$attempt"
fi

trap 'note term; echo "$stage got SIGTERM; stopping"; exit 143' TERM
# Printed before the start is noted, so that a test that saw the start finds it in the log.
echo "$stage: working on $job (attempt $attempt)"
note start

n=0
while [[ -e "$dir/hold-$job-$stage" ]]; do
  # In the background, so that SIGTERM interrupts the wait at once.
  sleep 0.05 &
  wait $!
  n=$((n + 1))
  if [[ -e "$dir/tick-$job-$stage" ]] && ((n % 4 == 0)); then
    echo "$stage: tick $((n / 4))"
  fi
done

case ${MODEL:-} in
  sleep:*)
    sleep "${MODEL#sleep:}" &
    wait $!
    ;;
esac

if [[ -e "$dir/fail-$job-$stage" ]]; then
  status=$(<"$dir/fail-$job-$stage")
  echo "$stage: fatal: out of disk (stub)"
  note end
  exit "$status"
fi

echo "$stage: done"
note end
