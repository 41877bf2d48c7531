#!/usr/bin/env bash
# One wave of a campaign on a machine that keeps nothing between runs (a lent or preemptible GPU): run the trials of
# SWEEP that no export in DONE holds (at most MAX_TRIALS of them, within LIMIT_S seconds), then export every trial
# this machine's MLflow store holds to OUT, whatever the sweep's end. Merge the waves elsewhere with `overtok merge`.
# Run again on the same machine while it keeps its files, the same command runs the next MAX_TRIALS trials (those
# its MLflow store holds FINISHED do not count).
#
#   scripts/wave.sh SWEEP.yaml DONE OUT [MAX_TRIALS] [LIMIT_S] [SWEEP_ARGS...]
#
#   SWEEP.yaml  the campaign's sweep file
#   DONE        the merged export of the earlier waves (a folder that does not exist counts as none)
#   OUT         where the export and the wave's log (sweep.log) go
#   MAX_TRIALS  default 3; LIMIT_S (seconds for the sweep, the export excluded) default 540
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
sweep=$1 done=$2 out=$3 max_trials=${4:-3} limit=${5:-540}
shift $(( $# < 5 ? $# : 5 ))
[ -f "$sweep" ] || { echo "scripts/wave.sh: $sweep: no such sweep file" >&2; exit 2; }
case $max_trials$limit in *[!0-9]*) echo "scripts/wave.sh: MAX_TRIALS and LIMIT_S are whole numbers" >&2; exit 2;; esac
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
skip=()
[ -e "$done" ] && skip=(--skip-done "$done")
# SIGTERM at the limit, to the sweep's driver alone (--foreground): it ends the running trials KILLED (resumable)
# and stops Ray; SIGKILL 30 s later if it hangs. Sent to the whole process group, as timeout does by default, it
# also reached Ray's own processes, and a driver still in ray.init then waited on them until the SIGKILL
timeout --foreground -k 30 "$limit" "$py" -m overtok sweep "$sweep" "${skip[@]}" --max-trials "$max_trials" "$@" >> "$log" 2>&1
rc=$?
echo "sweep exit status $rc" >> "$log"
"$py" -m overtok export "$sweep" --out "$out" >> "$log" 2>&1
exported=$?
date -u +"wave end %Y-%m-%dT%H:%M:%SZ" >> "$log"
# a sweep stopped by the time limit (124) still exports what finished; the export's status is the wave's
exit $exported
