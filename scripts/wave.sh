#!/usr/bin/env bash
# One wave of a campaign on a machine that keeps nothing between runs (a lent or preemptible GPU): run the trials of
# SWEEP that no export in DONE holds, as many as finish within LIMIT_S seconds (`overtok sweep --time-limit`: a
# trial starts only if the one before it, scaled to its size, says it ends in time) and at most MAX_TRIALS, then
# export every trial this machine's MLflow store holds to OUT, whatever the sweep's end. Merge the waves elsewhere
# with `overtok merge`. Run again on the same machine while it keeps its files, the same command runs the next
# trials (those its MLflow store holds FINISHED do not count).
#
#   scripts/wave.sh SWEEP.yaml DONE OUT [MAX_TRIALS] [LIMIT_S] [SWEEP_ARGS...]
#
#   SWEEP.yaml  the campaign's sweep file
#   DONE        the merged export of the earlier waves, or - for none (the first wave); a DONE that does not
#               exist is refused, so that a mistyped one does not rerun every finished trial
#   OUT         where the export and the wave's log (sweep.log) go
#   MAX_TRIALS  0 (the default): as many as the time allows
#   LIMIT_S     seconds for the sweep, the export excluded (about 10 s more); default 540
#   SWEEP_ARGS  more arguments of `overtok sweep`, e.g. --seeds 1 to finish one seed first
#
# Environment, both optional:
#   OVERTOK_SITE  a tar.xz of site-packages to unpack and put on PYTHONPATH (e.g. Ray and MLflow for a machine
#                 that has torch but not them)
#   OVERTOK_LINKS space-separated CARRIED:PATH pairs: PATH becomes a symbolic link to CARRIED unless it exists, so
#                 that the sweep's data paths (part of each trial's id) name the same files here as where the
#                 campaign was planned, e.g. "data_cache_code/code:../shared/data/code"
set -uo pipefail

if [ $# -lt 3 ]; then
    echo "usage: scripts/wave.sh SWEEP.yaml DONE OUT [MAX_TRIALS] [LIMIT_S] [SWEEP_ARGS...]" >&2
    exit 2
fi
sweep=$1 done=$2 out=$3 max_trials=${4:-0} limit=${5:-540}
shift $(( $# < 5 ? $# : 5 ))
[ -f "$sweep" ] || { echo "scripts/wave.sh: $sweep: no such sweep file" >&2; exit 2; }
case $max_trials$limit in *[!0-9]*) echo "scripts/wave.sh: MAX_TRIALS and LIMIT_S are whole numbers" >&2; exit 2;; esac
[ "$limit" -ge 1 ] || { echo "scripts/wave.sh: LIMIT_S is at least 1 second" >&2; exit 2; }
[ "$done" = - ] || [ -d "$done" ] || { echo "scripts/wave.sh: DONE $done: no such export (- for none)" >&2; exit 2; }
mkdir -p "$out"
log=$out/sweep.log
py=${PYTHON:-python3}

if [ -n "${OVERTOK_SITE:-}" ]; then
    site=$(mktemp -d)
    tar -xJf "$OVERTOK_SITE" -C "$site" || { echo "scripts/wave.sh: cannot unpack $OVERTOK_SITE" >&2; exit 2; }
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
for pair in ${OVERTOK_LINKS:-}; do
    carried=${pair%%:*} path=${pair#*:}
    if [ ! -e "$path" ]; then
        mkdir -p "$(dirname "$path")" && ln -s "$(cd "$(dirname "$carried")" && pwd)/$(basename "$carried")" "$path"
    fi
done

# which code ran: the hash of overtok's sources, as each run's tag overtok.code (a copied checkout's .git can lag
# the files it came with, so the git line may name an older commit)
{ date -u +"wave start %Y-%m-%dT%H:%M:%SZ"; command -v nvidia-smi >/dev/null && nvidia-smi -L
  "$py" -c 'from overtok.identity import code_version; print("overtok code", code_version())'
  echo "git HEAD $(git rev-parse HEAD 2>/dev/null)"; } >> "$log"
subset=()
[ "$done" = - ] || subset=(--skip-done "$done")
[ "$max_trials" -gt 0 ] && subset+=(--max-trials "$max_trials")
# the sweep keeps its own limit; timeout only guards against a driver that hangs: SIGTERM 20 s past the limit, to
# the driver alone (--foreground: sent to the whole process group, it also reached Ray's own processes, and a
# driver still in ray.init then waited on them), SIGKILL 30 s later
timeout --foreground -k 30 $((limit + 20)) "$py" -m overtok sweep "$sweep" "${subset[@]}" --time-limit "$limit" "$@" \
    >> "$log" 2>&1
rc=$?
echo "sweep exit status $rc" >> "$log"
"$py" -m overtok export "$sweep" --out "$out" >> "$log" 2>&1
exported=$?
date -u +"wave end %Y-%m-%dT%H:%M:%SZ" >> "$log"
# a sweep stopped by the time limit (124) still exports what finished; the export's status is the wave's
exit $exported
