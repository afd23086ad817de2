#!/usr/bin/env bash
# The CPU studies still to finish, in priority order, on every core of a small machine:
#
#   setsid nohup bash benchmarks/backlog.sh > runs/backlog.log 2>&1 &
#   kill -TERM -- -$(pgrep -of "bash benchmarks/backlog.sh")    # stop: the whole group;
#                                        # SIGTERM makes each training process checkpoint
#
# Two lanes (LANES, one thread each) walk the same list of training queues (benchmarks/study.py:
# a run is claimed with a lock file, so the lanes share each queue's runs and never run one
# twice); then the single-process stages run, the scheduling ones beside the others (paired
# evaluations, the DID study's evaluations, memory and sampling, reports); a study's stages
# run earlier, in the first lane that finds its runs finished (``once``: a lock per study, so
# the other lane keeps training). Every command
# resumes or skips what is done, so after a stop the same command continues where the studies
# were. Priority: the parity study's ablations (cpu regime), its
# GPT-2-vocabulary regime, the converged AR judge, the scheduling study's MDLM pair (4000
# steps), the DID study's runs, the scheduling study's TDLM pair (4000 steps; the two heavy
# models are also the parity study's seed-0 pair at 4x the budget), then the stages that
# need the judge.
# PARITY_SRC (default: this checkout's src) is the library the cpu-regime parity runs use: the
# study's first runs were made at cc8ff46, so set it to a checkout of that commit to finish
# them with the same code. The exit status is non-zero when any command failed.
set -u
PARITY_SRC=$(realpath "${PARITY_SRC:-$(dirname "$0")/../src}")
cd "$(dirname "$0")/.."
LANES=${LANES:-2}
SRC=$PWD/src
FAILED=0
fail() { echo "[backlog] FAILED ($?): $*"; FAILED=1; }
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

JUDGE=runs/judge/ar-judge
SCHED=runs/sched-paper
DID_RUNS="runs/did-study/did-s0 runs/did-study/mdlm-s0 runs/did-study/did-s1 runs/did-study/mdlm-s1
  runs/did-study/did-s2 runs/did-study/mdlm-s2 runs/did-study/did-var-s0 runs/did-study/mdlm-var-s0"

ready() { PYTHONPATH=$SRC python benchmarks/study.py finished "$@"; }

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

queues() {      # the training queues, every lane in the same order; a study's stages run in
                # the first lane that finds its runs finished (the other lane keeps training)
  PYTHONPATH=$PARITY_SRC python benchmarks/parity.py run --ablations --lanes 1 \
    || fail parity ablations
  PYTHONPATH=$SRC python benchmarks/parity.py run --regime gpt2 --lanes 1 || fail parity gpt2
  PYTHONPATH=$SRC python benchmarks/judge.py run --threads 1 || fail judge
  PYTHONPATH=$SRC python benchmarks/scheduling.py --scale cpu --stage run --lanes 1 \
    || fail scheduling run
  ready $JUDGE $SCHED/heavy $SCHED/light && once sched-mdlm scheduling_mdlm_stages
  PYTHONPATH=$SRC python benchmarks/did_study.py run --lanes 1 || fail did_study run
  # shellcheck disable=SC2086
  ready $JUDGE $DID_RUNS && once did-stages did_stages
  PYTHONPATH=$SRC python benchmarks/scheduling.py --scale cpu --stage run-levels --lanes 1 \
    || fail scheduling run-levels
  ready $JUDGE $SCHED/heavy $SCHED/light $SCHED/tdlm-heavy $SCHED/tdlm-light \
    && once sched-levels scheduling_levels_stages
  return $FAILED
}

sched() {       # one scheduling stage (single-threaded)
  PYTHONPATH=$SRC python benchmarks/scheduling.py --scale cpu --stage "$1" \
    || { fail scheduling "$1"; return 1; }
}

scheduling_mdlm_stages() {      # needs the MDLM pair and the judge
  PYTHONPATH=$SRC python benchmarks/judge.py report || fail judge report
  for st in train analyze search prefix report; do sched "$st" || break; done
  return $FAILED
}

scheduling_levels_stages() {    # needs the TDLM pair too; the parity report then reads the
  sched levels && sched report  # 4000-step heavy pair (mdlm-cpu 12 vs tdlm-cpu 17 blocks)
  PYTHONPATH=$SRC python benchmarks/parity.py report || fail parity report
  return $FAILED
}

scheduling_stages() {   # one process at a time (the search is single-threaded)
  for st in train analyze search prefix levels report; do
    sched "$st" || break
  done
  return $FAILED
}

did_stages() {
  { PYTHONPATH=$SRC python benchmarks/did_study.py equal \
    && PYTHONPATH=$SRC python benchmarks/did_study.py memory \
    && PYTHONPATH=$SRC python benchmarks/did_study.py sample --judge $JUDGE \
    && PYTHONPATH=$SRC python benchmarks/did_study.py report; } || fail did_study stages
  return $FAILED
}

report_stages() {
  { python benchmarks/parity.py paired && python benchmarks/parity.py report; } \
    || fail parity report
  { python benchmarks/parity.py paired --regime gpt2 \
    && python benchmarks/parity.py report --regime gpt2; } || fail parity gpt2 report
  python benchmarks/judge.py report || fail judge report
  did_stages
  return $FAILED
}

stages() {      # after every lane's queues: the scheduling stages beside the others
  export PYTHONPATH=$SRC
  if [ "$LANES" -ge 2 ]; then
    scheduling_stages & sp=$!
    report_stages || FAILED=1
    wait "$sp" || FAILED=1
  else
    scheduling_stages
    report_stages
  fi
}

pids=()
for i in $(seq 2 "$LANES"); do
  ( echo "[backlog] lane $i start $(date +%T)"; queues; rc=$?
    echo "[backlog] lane $i done $(date +%T)"; exit $rc ) &
  pids+=($!)
done
echo "[backlog] lane 1 start $(date +%T)"
queues
for p in "${pids[@]}"; do       # the other lanes' queues
  wait "$p" || FAILED=1
done
echo "[backlog] stages start $(date +%T)"
stages
echo "[backlog] done $(date +%T), failed=$FAILED"
exit $FAILED
