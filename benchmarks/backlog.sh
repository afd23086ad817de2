#!/usr/bin/env bash
# The CPU studies still to finish for issue 17, in order, on every core of a small machine:
#
#   setsid nohup bash benchmarks/backlog.sh > runs/backlog.log 2>&1 &
#   kill -TERM -- -$(pgrep -of "bash benchmarks/backlog.sh")    # stop: the whole group;
#                                        # SIGTERM makes the training process checkpoint
#   STAGES="tree-prefix" bash benchmarks/backlog.sh              # only some of the stages
#
# Every command resumes or skips what is done, so after a stop the same command continues
# where the studies were -- on the same machine: runs/ (weights, checkpoints) is lost with a
# machine change, and a run that cannot finish within one session is lost with it.
#
# Stages (session 24's plan; the earlier stages -- the 2000-step judge, its rescoring of the
# fine blocks, DID variable-length seeds 6 and 7 -- are done and committed):
#   judge   the next doubling of the AR judge: 16000 steps (its own cosine schedule, ~6 h of
#           2 cores at ~3,100 tokens/s; started in session 22, runs/judge-16000, checkpoints
#           every 100 steps) -- skipped once benchmarks/results/judge-16000/judge.json is
#           committed -- then its report against the archived 8000-step judge (the doubling
#           rule), its archive, the DID study's samples scored under it (the earlier judges'
#           scores kept in samples/earlier-judges), the study's report, and the n-gram /
#           AR judges' table (benchmarks/judges.py) under it.
#   tree-prefix  (not in the default STAGES: ~3 h) the TDLM scheduling pair trained again in a
#           fresh work folder (the archived pair's weights are gone), stage prefix sampled on
#           it under session 22's prefix convention (the prefix shown at level h as its
#           height-h ancestors; the committed rows, sampled before, are replaced: stage prefix
#           re-samples a search of an earlier convention), the new pair archived, and
#           scheduling_cpu_tree.md regenerated from the archive (its prefix section names the
#           retrained pair's NELBOs, prefix/pair.json, and the judge, the 2000-step one).
#   tree-fine  (not a default; after tree-prefix, which trains the pair: ~1.5 h) stage fine
#           again at 32 seeds on that pair, two lanes: the committed 16 seeds (another training)
#           are superseded; the report said a difference as large as the one seen between the
#           placements needs about 31 seeds to be told apart. Then the tree report again.
# The exit status is non-zero when a command failed.
set -u
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
STAGES=${STAGES:-judge}
SRC=$PWD/src
FAILED=0
fail() { echo "[backlog] FAILED ($?): $*"; FAILED=1; }
has() { case " $STAGES " in *" $1 "*) return 0;; esac; return 1; }
export PYTHONPATH=$SRC
python -c "import torch, matplotlib" 2>/dev/null \
  || { echo "[backlog] this python ($(command -v python)) lacks torch or matplotlib: activate the project's venv"; exit 2; }

J=runs/judge-16000
if has judge && [ ! -f benchmarks/results/judge-16000/judge.json ]; then
  echo "[backlog] judge-16000 start $(date +%T)"
  python benchmarks/judge.py run --threads "$THREADS" --budget 16000 --work $J || fail judge-16000
  if python benchmarks/study.py finished $J/ar-judge; then
    echo "[backlog] judge-16000 finished $(date +%T)"
    { python benchmarks/judge.py report --work $J --budget 16000 \
        --short benchmarks/results/runs/judge/ar-judge --out benchmarks/results/judge-16000 \
      && python benchmarks/study.py archive $J benchmarks/results/runs/judge-16000; } \
      || fail judge-16000 report
    { python benchmarks/did_study.py sample --work benchmarks/results/runs/did-study \
        --judge $J/ar-judge \
      && python benchmarks/did_study.py report --work benchmarks/results/runs/did-study; } \
      || fail did_study rescore
    python benchmarks/judges.py --work runs/judges --ar-judge $J/ar-judge \
      --short-context 3 --short-context 15 --short-context 63 || fail judges
  else
    echo "[backlog] judge-16000 is not finished: nothing scored"; FAILED=1
  fi
fi
W=runs/sched-tree2
if has tree-prefix; then
  echo "[backlog] TDLM pair (again) start $(date +%T)"
  { python benchmarks/scheduling.py --scale cpu --pair tree --work $W --stage run-levels \
      --threads "$THREADS" \
    && python benchmarks/scheduling.py --scale cpu --pair tree --work $W \
      --judge runs/judge-2000/ar-judge --stage prefix \
    && python benchmarks/study.py archive $W benchmarks/results/runs/sched-tree2 \
    && python benchmarks/scheduling.py --scale cpu --pair tree \
      --work benchmarks/results/runs/sched-paper --judge benchmarks/results/runs/judge/ar-judge \
      --stage report; } || fail tree-prefix
fi
if has tree-fine; then
  # two lanes (one thread each) share the blocks through lock files
  echo "[backlog] TDLM pair, stage fine at 32 seeds start $(date +%T)"
  fine() { python benchmarks/scheduling.py --scale cpu --pair tree --work $W \
             --judge runs/judge-2000/ar-judge --stage fine --fine-seeds 32; }
  fine & lane=$!
  fine; r2=$?
  wait $lane; r1=$?
  { [ $r1 -eq 0 ] && [ $r2 -eq 0 ] \
    && python benchmarks/scheduling.py --scale cpu --pair tree \
      --work benchmarks/results/runs/sched-paper --judge benchmarks/results/runs/judge/ar-judge \
      --stage report; } || fail tree-fine
fi
echo "[backlog] done $(date +%T), failed=$FAILED"
exit $FAILED
