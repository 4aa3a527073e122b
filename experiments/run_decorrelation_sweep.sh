#!/usr/bin/env bash
# Run the decorrelation sweep (issue 12) in the background from a frozen checkout, so that edits to this checkout
# never reach a running sweep and every row comes from the same training code (PIN, the commit the first rows
# were trained with). Resumable: run it again after a stop; finished points are skipped and a killed point
# continues from its last finished epoch.
#
#   experiments/run_decorrelation_sweep.sh                     # every remaining point, in the sweep file's order
#   experiments/run_decorrelation_sweep.sh --point vsr-kv5-dec100 --point vsr-kv5-dec100000   # chosen points
#
# Other sweeps run the same way from their own worktree, e.g. the MoME experiment (issue 15):
#   SWEEP=experiments/configs/sweep_mome.yaml RESULTS=experiments/results/mome.csv WT=/work/mome \
#     PIN=$(git rev-parse HEAD) experiments/run_decorrelation_sweep.sh
#
# Then, after each new row: cp $WT/experiments/results/decorrelation.csv experiments/results/, then
# python experiments/decorrelation_figures.py and python experiments/decorrelation_table.py, and commit.
# Pause it while tests or benchmarks run (kill -STOP / kill -CONT on its PID): two torch jobs on two cores
# slow each other about fivefold.
if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then  # the header above, without starting anything
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0
fi
set -euo pipefail
MAIN=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
PIN=${PIN:-ab88f420e0bcd6c675474a367fce11eb60087c41}
WT=${WT:-$(dirname "$MAIN")/sweep}  # a worktree beside this checkout
PY=${PY:-$MAIN/.venv/bin/python}
SWEEP=${SWEEP:-experiments/configs/sweep_decorrelation.yaml}
RESULTS=${RESULTS:-experiments/results/decorrelation.csv}
cd "$MAIN"
if [ ! -f corpora/grid-2k/manifest.jsonl ]; then
  echo "corpora/grid-2k is missing: regenerating it (deterministic, about a minute)"
  HF_HUB_OFFLINE=1 "$MAIN/.venv/bin/sinkscope" data synth --out corpora/grid-2k --n 2000 --seed 0 --workers 2
fi
[ -d "$WT" ] || git worktree add -f "$WT" "$PIN"
# the sweep file and the rows of this checkout are the record: the worktree runs what they say
cp "$SWEEP" "$WT/$SWEEP"
if [ -f "$RESULTS" ] && { [ ! -f "$WT/$RESULTS" ] || [ "$(wc -l < "$RESULTS")" -gt "$(wc -l < "$WT/$RESULTS")" ]; }; then
  cp "$RESULTS" "$WT/$RESULTS"
fi
[ -e "$WT/corpora" ] || ln -s "$MAIN/corpora" "$WT/corpora"
mkdir -p logs
cd "$WT"
HF_HUB_OFFLINE=1 PYTHONPATH="$WT" setsid nohup nice -n 10 "$PY" -m sinkscope sweep \
  --config "$SWEEP" "$@" >> "$MAIN/logs/$(basename "$SWEEP" .yaml).log" 2>&1 < /dev/null &
echo "sweep started (pid $!) in $WT; log: $MAIN/logs/$(basename "$SWEEP" .yaml).log"
