#!/usr/bin/env bash
# The CPU studies still to finish, in order, on every core of a small machine:
#
#   setsid nohup bash benchmarks/backlog.sh > runs/backlog.log 2>&1 &
#   kill -TERM -- -$(pgrep -of "bash benchmarks/backlog.sh")    # stop: the whole group;
#                                        # SIGTERM makes the training process checkpoint
#   STAGES="did" bash benchmarks/backlog.sh                      # only some of the stages
#
# Every command resumes or skips what is done, so after a stop the same command continues
# where the studies were -- on the same machine: runs/ (weights, checkpoints) does not survive
# a machine change, so a run that cannot finish within one session is lost with it.
#
# Stages (session 19's plan; its machine, an AVX2-only EPYC, trained the AR judge at ~1,500
# tokens/s on 2 threads, a third of the earlier machines' rate, so the 8000-step judge took
# ~6 h there and a DID variable-length seed pair ~2 h per lane):
#   judge  the AR judge trained 2000 steps (its own cosine schedule; ~1.5 h on 2 threads) into
#          runs/judge-2000 -- skipped once benchmarks/results/judge-2000/judge.json is
#          committed -- then its report and archive, stage rescore-fine (issue 17's fine
#          blocks, sampled without a judge in session 18, samples committed) under it, the
#          scheduling report regenerated from the archive, and benchmarks/judges.py (the
#          n-gram judges' table, which lists the AR judges' own NLL) again. Session 19 trained
#          it (own NLL 4.158, no better than the Kneser-Ney 4-gram's 4.147: judges.md) and
#          committed its report, so this stage is skipped; its rescore-fine was stopped (one
#          thread scores ~6 min per schedule and block there: ~2 h for the fine blocks).
#   did    two more variable-length DID/MDLM seed pairs (6, 7; 2 lanes) for the equal-FLOPs
#          NELBO that 6 seeds left undecided (-0.99% +- 1.43%), their equal-FLOPs evaluations,
#          the archive, and the report from it over seeds 0-7 (then make 0-7 did_study.py's
#          default --variable-seeds).
# The exit status is non-zero when a command failed.
set -u
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
STAGES=${STAGES:-judge did}
SRC=$PWD/src
FAILED=0
fail() { echo "[backlog] FAILED ($?): $*"; FAILED=1; }
has() { case " $STAGES " in *" $1 "*) return 0;; esac; return 1; }
export PYTHONPATH=$SRC
python -c "import torch, matplotlib" 2>/dev/null \
  || { echo "[backlog] this python ($(command -v python)) lacks torch or matplotlib: activate the project's venv"; exit 2; }

J=runs/judge-2000
if has judge && [ ! -f benchmarks/results/judge-2000/judge.json ]; then
  echo "[backlog] judge-2000 start $(date +%T)"
  python benchmarks/judge.py run --threads "$THREADS" --budget 2000 --work $J || fail judge-2000
  if python benchmarks/study.py finished $J/ar-judge; then
    echo "[backlog] judge-2000 finished $(date +%T)"
    { python benchmarks/judge.py report --work $J --budget 2000 --short '' \
        --out benchmarks/results/judge-2000 \
      && python benchmarks/study.py archive $J benchmarks/results/runs/judge-2000; } \
      || fail judge-2000 report
    { python benchmarks/scheduling.py --scale cpu --pair tree --work runs/sched-paper \
        --judge $J/ar-judge --stage rescore-fine \
      && python benchmarks/scheduling.py --scale cpu --pair tree \
        --work benchmarks/results/runs/sched-paper \
        --judge benchmarks/results/runs/judge/ar-judge --stage report; } \
      || fail scheduling rescore-fine
    python benchmarks/judges.py || fail judges
  else
    echo "[backlog] judge-2000 is not finished: nothing scored"; FAILED=1
  fi
fi
if has did; then
  echo "[backlog] DID variable seeds 6 7 start $(date +%T)"
  { python benchmarks/did_study.py run --seeds --variable-seeds 6 7 --lanes 2 \
    && python benchmarks/did_study.py equal --seeds --variable-seeds 6 7 \
    && python benchmarks/study.py archive runs/did-study benchmarks/results/runs/did-study \
    && python benchmarks/did_study.py report --work benchmarks/results/runs/did-study \
      --variable-seeds 0 1 2 3 4 5 6 7; } || fail did variable seeds
fi
echo "[backlog] done $(date +%T), failed=$FAILED"
exit $FAILED
