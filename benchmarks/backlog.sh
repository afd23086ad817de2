#!/usr/bin/env bash
# The CPU studies still to finish, in priority order, on every core of a small machine:
#
#   setsid nohup bash benchmarks/backlog.sh > runs/backlog.log 2>&1 &
#   kill -TERM -- -$(pgrep -of "bash benchmarks/backlog.sh")    # stop: the whole group;
#                                        # SIGTERM makes each training process checkpoint
#
# Two lanes (LANES, one thread each) walk the same list of training queues (benchmarks/study.py:
# a run is claimed with a lock file, so the lanes share each queue's runs and never run one
# twice); a study's stages run in the first lane that finds its runs finished (``once``: a lock
# per study, so the other lane keeps training), and again in a final pass. Every command
# resumes or skips what is done, so after a stop the same command continues where the studies
# were.
#
# Priority (session 17's plan for a machine whose runs/ is empty: every finished study is
# archived in benchmarks/results/runs/, but no weights are, and a 3-hour session on 2 cores
# holds ~5 core-hours):
#   1. issue 17's scheduling target at step granularity (scheduling.py stage fine: 6
#      schedules x 16 seeds x 32 samples, ~1.6 core-hours) on the TDLM pair, trained again
#      first (tdlm-heavy ~1.9 h, tdlm-light ~0.7 h of one core: the pair's weights were lost
#      with the machine); sampled WITHOUT a judge (--score-later: the judge's weights were lost
#      too), its samples kept and committed, so any later judge scores them.
#   2. the AR judge trained again (8000 steps, ~2.4 h of one core) into runs/judge-v2 (not
#      runs/judge: the committed reports name the first one), in the lane that waits for the
#      heavy model, at nice 19 so that it yields to stage fine; resumable. Once it has
#      finished, stage rescore-fine scores the fine blocks under it and the report is
#      regenerated from the archive (the fine section names its pair and judge). Its own NLL
#      against the first judge's 3.6171 measures how far a retrained judge moves.
# The fine blocks go straight to benchmarks/results/scheduling_cpu_tree/fine/ (commit them);
# the retrained pair is NOT archived over benchmarks/results/runs/sched-paper (the committed
# search was sampled from the earlier training; the fine section names its own pair's NELBO).
# Not queued: finished and archived studies (parity, DID, the first judge, the search).
# The exit status is non-zero when a command failed.
set -u
cd "$(dirname "$0")/.."
LANES=${LANES:-2}
SRC=$PWD/src
FAILED=0
fail() { echo "[backlog] FAILED ($?): $*"; FAILED=1; }
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=$SRC
python -c "import torch, matplotlib" 2>/dev/null \
  || { echo "[backlog] this python ($(command -v python)) lacks torch or matplotlib: activate the project's venv"; exit 2; }

JUDGE2=runs/judge-v2/ar-judge
SCHED=runs/sched-paper
ARCHIVE=benchmarks/results/runs/sched-paper
POLL=${POLL:-60}

ready() { python benchmarks/study.py finished "$@"; }
tree() { python benchmarks/scheduling.py --scale cpu --pair tree --work $SCHED "$@"; }

LOCKS=$(mktemp -d "${TMPDIR:-/tmp}/backlog-locks.XXXXXX")     # this invocation's
once() {        # once NAME FUNCTION: FUNCTION in one lane, once per invocation of this script
  ( flock -n 9 || { echo "[backlog] $1: another lane has it"; exit 0; }
    [ -e "$LOCKS/$1.done" ] && exit 0
    FAILED=0          # this subshell's own failures only (the lane's stay the lane's)
    echo "[backlog] $1 start $(date +%T)"; "$2"; rc=$?
    echo "[backlog] $1 done $(date +%T), rc=$rc"; [ $rc -eq 0 ] && touch "$LOCKS/$1.done"
    exit $rc
  ) 9>"$LOCKS/$1" || fail "$1"
}

judge2() {      # the judge trained again, low priority, in the background of this lane
  mkdir -p runs
  nice -n 19 python benchmarks/judge.py run --threads 1 --work runs/judge-v2 \
    >> runs/judge-v2.log 2>&1 &
}

queues() {      # every lane in the same order
  python benchmarks/scheduling.py --scale cpu --stage run-levels --lanes 1 \
    || fail scheduling run-levels
  # the lane that finished its run first starts the judge, then waits for the other run
  if ! ready $SCHED/tdlm-heavy $SCHED/tdlm-light; then
    once judge2 judge2
    while ! ready $SCHED/tdlm-heavy $SCHED/tdlm-light; do
      # a run in training holds its claim (benchmarks/study.py); neither held: it failed
      if flock -n "$SCHED/tdlm-heavy.lock" true 2>/dev/null \
          && flock -n "$SCHED/tdlm-light.lock" true 2>/dev/null; then
        echo "[backlog] the pair is neither finished nor training"; return 1
      fi
      sleep "$POLL"
    done
  fi
  tree --stage fine --score-later || fail scheduling fine
  return $FAILED
}

stages() {      # after every lane's queues: the judge (waited for), the fine blocks scored
  ready $SCHED/tdlm-heavy $SCHED/tdlm-light || return $FAILED
  tree --stage fine --score-later || fail scheduling fine    # a block a stopped lane left
  # the low-priority judge: stopped (SIGTERM makes its trainer checkpoint) and resumed at
  # normal priority on both cores, now that nothing else runs
  pkill -TERM -f -- "--out runs/judge-v2/ar-judge" 2>/dev/null
  while pgrep -f -- "--work runs/judge-v2" >/dev/null; do sleep 5; done
  python benchmarks/judge.py run --threads 2 --work runs/judge-v2 || fail judge-v2
  ready $JUDGE2 || return $FAILED
  { tree --judge $JUDGE2 --stage rescore-fine \
    && python benchmarks/scheduling.py --scale cpu --pair tree --work $ARCHIVE \
         --judge benchmarks/results/runs/judge/ar-judge --stage report; } \
    || fail scheduling rescore-fine
  return $FAILED
}

pids=()
for i in $(seq 2 "$LANES"); do
  ( echo "[backlog] lane $i start $(date +%T)"; queues; rc=$?
    echo "[backlog] lane $i done $(date +%T)"; exit $rc ) &
  pids+=($!)
done
echo "[backlog] lane 1 start $(date +%T)"
queues || FAILED=1
for p in "${pids[@]}"; do       # the other lanes' queues
  wait "$p" || FAILED=1
done
echo "[backlog] stages start $(date +%T)"
stages
echo "[backlog] done $(date +%T), failed=$FAILED"
exit $FAILED
