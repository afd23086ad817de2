#!/usr/bin/env bash
# The CPU studies still to finish, in order, on every core of a small machine:
#
#   setsid nohup bash benchmarks/backlog.sh > runs/backlog.log 2>&1 &
#   kill -TERM -- -$(pgrep -of "bash benchmarks/backlog.sh")    # stop: the whole group;
#                                        # SIGTERM makes the training process checkpoint
#
# Every command resumes or skips what is done, so after a stop the same command continues
# where the studies were -- on the same machine: runs/ (weights, checkpoints) does not survive
# a machine change, so a run that cannot finish within one session is lost with it.
#
# The plan for a machine whose runs/ is empty (session 18's; a 3-hour session on 2 cores):
#   1. the AR judge trained again (8000 steps, both cores: ~1.5 h) into runs/judge-v2 (not
#      runs/judge: the committed reports name the first one); its own report goes to
#      benchmarks/results/judge-v2/ (its NLL against the first judge's 3.6171: how far a
#      retrained judge moves) and its small outputs to benchmarks/results/runs/judge-v2.
#   2. stage rescore-fine: scores issue 17's fine blocks (25 light steps of 64, sampled in
#      session 18 from a retrained TDLM pair WITHOUT a judge; their samples are committed in
#      benchmarks/results/scheduling_cpu_tree/fine/) under that judge; no model is needed, so
#      runs/sched-paper may be empty. Then the report is regenerated from the archive (the
#      fine section names its pair and judge). Commit the fine blocks, fine/judge.json, the
#      report and the judge's report; update the README's scheduling paragraph.
# Not queued: finished and archived studies (parity, DID, the first judge, the search, the
# fine blocks' sampling: the pair that sampled them is gone, so a block still missing needs
# the pair trained again: `scheduling.py --scale cpu --stage run-levels --lanes 2`, ~1.3 h
# on 2 cores, then `--pair tree --work runs/sched-paper --stage fine --score-later`).
# The exit status is non-zero when a command failed.
set -u
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
SRC=$PWD/src
FAILED=0
fail() { echo "[backlog] FAILED ($?): $*"; FAILED=1; }
export PYTHONPATH=$SRC
python -c "import torch, matplotlib" 2>/dev/null \
  || { echo "[backlog] this python ($(command -v python)) lacks torch or matplotlib: activate the project's venv"; exit 2; }

JUDGE2=runs/judge-v2/ar-judge
echo "[backlog] judge-v2 start $(date +%T)"
python benchmarks/judge.py run --threads "$THREADS" --work runs/judge-v2 || fail judge-v2
if python benchmarks/study.py finished $JUDGE2; then
  echo "[backlog] judge-v2 finished $(date +%T)"
  { python benchmarks/judge.py report --work runs/judge-v2 --out benchmarks/results/judge-v2 \
    && python benchmarks/study.py archive runs/judge-v2 benchmarks/results/runs/judge-v2; } \
    || fail judge-v2 report
  { python benchmarks/scheduling.py --scale cpu --pair tree --work runs/sched-paper \
      --judge $JUDGE2 --stage rescore-fine \
    && python benchmarks/scheduling.py --scale cpu --pair tree \
      --work benchmarks/results/runs/sched-paper \
      --judge benchmarks/results/runs/judge/ar-judge --stage report; } \
    || fail scheduling rescore-fine
else
  echo "[backlog] judge-v2 is not finished: nothing scored"; FAILED=1
fi
echo "[backlog] done $(date +%T), failed=$FAILED"
exit $FAILED
