#!/usr/bin/env bash
# Trains the demo AVSR model and its ASR / VSR baselines in slices and evaluates each slice with `sinkscope eval`.
# Every step resumes: re-running the script skips finished epochs and evaluations, so it can be stopped at any
# time (kill it) and started again, in this session or a later one.
#
#   experiments/train_demo_models.sh 3 avsr-v3 asr-v3 vsr   # all three up to epoch 3 of their 10-epoch schedule
#   experiments/train_demo_models.sh 5 avsr-v3              # then carry the AVSR model on to epoch 5 (the demo)
#
# Results: experiments/results/eval/<mode>_e<epoch>_<clean|snr0>.json (the results.json of `sinkscope eval`: WER,
# CER, n, the command and the resolved config) and .csv (the hypotheses),
# on the first EVAL_LIMIT (default 200) utterances of the held-out test split. VSR has no audio, so it is only
# scored clean. EVAL_SNRS (default "clean 0") picks the conditions, e.g. EVAL_SNRS=clean for intermediate slices.
if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then  # the header above, without starting anything
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0
fi
set -euo pipefail
cd "$(dirname "$0")/.."
SINKSCOPE=${SINKSCOPE:-.venv/bin/sinkscope}
until_epoch=${1:?usage: $0 UNTIL_EPOCH MODE...}
shift
[[ "$until_epoch" =~ ^[1-9][0-9]*$ ]] || { echo "UNTIL_EPOCH must be a whole number >= 1, not '$until_epoch'" >&2; exit 2; }
[ $# -gt 0 ] || { echo "usage: $0 UNTIL_EPOCH MODE... (modes: vsr avsr-v3 asr-v3)" >&2; exit 2; }
# v3: the audio encoder CTC-pretrained for 24 epochs (experiments/weights/encoders-grid-2k-v2). The v2 models (8-epoch
# audio encoder; results avsr_e*, asr_e*) were made by configs removed with that encoder: see `git show
# ae56189:experiments/configs/grid_avsr_stack_a4_v2.yaml` (and grid_asr_stack.yaml).
declare -A config=([vsr]=grid_vsr_stack [avsr-v3]=grid_avsr_stack_a4_v3 [asr-v3]=grid_asr_stack_v3)
declare -A run=([vsr]=runs/vsr-grid-stack [avsr-v3]=runs/avsr-grid-stack-a4-v3 [asr-v3]=runs/asr-grid-stack-v3)
mkdir -p experiments/results/eval
for mode in "$@"; do
    [ -n "${config[$mode]:-}" ] || { echo "unknown mode $mode (one of ${!config[*]})" >&2; exit 2; }
    "$SINKSCOPE" train --config "experiments/configs/${config[$mode]}.yaml" --until-epoch "$until_epoch"
    epoch=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['epoch'])" "${run[$mode]}/state.json")
    read -r -a snrs <<< "${EVAL_SNRS:-clean 0}"
    [ "$mode" = vsr ] && snrs=(clean)
    for snr in "${snrs[@]}"; do
        tag=$([ "$snr" = clean ] && echo clean || echo "snr$snr")
        result="experiments/results/eval/${mode}_e${epoch}_${tag}.json"
        [ -s "$result" ] && continue
        out="runs/eval/${mode}_e${epoch}_${tag}"
        args=(--checkpoint "${run[$mode]}" --data corpora/grid-2k --split test --limit "${EVAL_LIMIT:-200}" --out "$out")
        [ "$snr" = clean ] || args+=(--snr "$snr")
        "$SINKSCOPE" eval "${args[@]}"
        cp "$out/hypotheses.csv" "${result%.json}.csv"
        cp "$out/results.json" "$result.partial" && mv "$result.partial" "$result"
    done
done
