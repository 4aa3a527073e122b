#!/usr/bin/env bash
# Run the decorrelation sweep (issue 12) in the background from a frozen checkout, so that edits to this checkout
# never reach a running sweep and every row comes from the same training code (PIN, the commit the first rows
# were trained with). Resumable: run it again after a stop; finished points are skipped and a killed point
# continues from its last finished epoch.
#
#   experiments/run_decorrelation_sweep.sh                     # every remaining point, in the sweep file's order
#   experiments/run_decorrelation_sweep.sh --point vsr-kv5-dec100 --point vsr-kv5-dec100000   # chosen points
#
# Then, after each new row: cp $WT/experiments/results/decorrelation.csv experiments/results/, then
# python experiments/decorrelation_figures.py and python experiments/decorrelation_table.py, and commit.
# Pause it while tests or benchmarks run (kill -STOP / kill -CONT on its PID): two torch jobs on two cores
# slow each other about fivefold.
set -euo pipefail
MAIN=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
PIN=${PIN:-ab88f420e0bcd6c675474a367fce11eb60087c41}
WT=${WT:-/work/sweep}
PY=${PY:-$MAIN/.venv/bin/python}
cd "$MAIN"
if [ ! -f corpora/grid-2k/manifest.jsonl ]; then
  echo "corpora/grid-2k is missing: regenerating it (deterministic, about a minute)"
  HF_HUB_OFFLINE=1 "$MAIN/.venv/bin/sinkscope" data synth --out corpora/grid-2k --n 2000 --seed 0 --workers 2
fi
[ -d "$WT" ] || git worktree add -f "$WT" "$PIN"
# the sweep file and the rows of this checkout are the record: the worktree runs what they say
cp experiments/configs/sweep_decorrelation.yaml "$WT/experiments/configs/sweep_decorrelation.yaml"
if [ "$(wc -l < experiments/results/decorrelation.csv)" -gt "$(wc -l < "$WT/experiments/results/decorrelation.csv")" ]; then
  cp experiments/results/decorrelation.csv "$WT/experiments/results/decorrelation.csv"
fi
[ -e "$WT/corpora" ] || ln -s "$MAIN/corpora" "$WT/corpora"
mkdir -p logs
cd "$WT"
HF_HUB_OFFLINE=1 PYTHONPATH="$WT" setsid nohup nice -n 10 "$PY" -m sinkscope sweep \
  --config experiments/configs/sweep_decorrelation.yaml "$@" >> "$MAIN/logs/sweep.log" 2>&1 < /dev/null &
echo "sweep started (pid $!) in $WT; log: $MAIN/logs/sweep.log"
