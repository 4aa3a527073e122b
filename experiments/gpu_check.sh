#!/usr/bin/env bash
# Issue 16 on a lent GPU, as one call: correctness first, then timings. Logs go to $OUT (the device tool brings
# them back). From this machine:
#   run(command="bash experiments/gpu_check.sh", carry=[".whl", "ab_prev"], timeout_s=590)
# (ab_prev/: an earlier commit's package for a same-machine before/after, `git archive <commit> sinkscope | tar -x
# -C ab_prev`; leave it out to skip stage 3). Environment knobs: TESTS / TEST_FILES / TEST_S (which tests, how
# long), FLAGS / BENCH_ARGS / BUDGET_S / DIAG_S / BENCH_S (the benchmark), AB_CASES / AB_S (stage 3). Session 15's calls:
#   TEST_S=100 TESTS=cuda TEST_FILES=tests/test_recorder.py FLAGS=--check BENCH_ARGS="--reps 5" BUDGET_S=190 \
#     BENCH_S=280 bash experiments/gpu_check.sh          (131 s: CUDA tests against eager, --check, the table)
# Session 19's calls (H200; wall 227 / 177 / 176 s):
#   1. TEST_S=90 TESTS="cuda or (column_sums_match and not rows) or takes_the_radix or matches_the_torch_path or \
#      full_map or token_stats_kernel or fold" TEST_FILES="tests/test_recorder.py tests/test_kernels.py" \
#      FLAGS="--launch --colsum --check --eager --host" BENCH_ARGS="--reps 5" BUDGET_S=230 BENCH_S=300 AB_S=70 \
#      bash experiments/gpu_check.sh; rm -rf $OUT/prev              (carry .whl and ab_prev: session 15's package)
#   2. and 3. (the fast launch and the prefault thread, against both off in the same process; 2 also --unpack):
#      TEST_S=70 TESTS="cuda or matches_the_torch_path or full_map or fold" TEST_FILES="tests/test_recorder.py \
#      tests/test_kernels.py" FLAGS="--launch --check --host --host-ab" BENCH_ARGS="--reps 5" BUDGET_S=170 \
#      BENCH_S=230 bash experiments/gpu_check.sh                        (carry .whl)
# Sessions 20-22 (no GPU) left for the next call (carry .whl; about 460 s of wall time, timeout_s=510): the
# CUDA tests of the buffers and plan kept across forwards, of the CUDA graphs (kernels.CUDA_GRAPHS, off by default
# until timed) and of the radix median (session 22's lean passes, session 21's digits spread over copies of their
# bins), then the radix configs (--radix: the run goes on with the fastest exact one; the row "median_before" is the
# shipped config with the passes before session 22), the end-of-forward unpacking through
# torch's threads against numpy's (--unpack, session 21), then the table with the recorder as
# shipped, with session 19's host changes off (--host-ab) and with graphs (--graphs):
#   TEST_S=100 TESTS="cuda or matches_the_torch_path or full_map or fold or layer_plan or graphs or \
#     radix_median_is_exact" TEST_FILES="tests/test_recorder.py tests/test_kernels.py" \
#     FLAGS="--radix --unpack --launch --check --host-ab --graphs --host" BENCH_ARGS="--reps 5" BUDGET_S=250 DIAG_S=50 \
#     BENCH_S=350 bash experiments/gpu_check.sh
# (--host with --graphs: the host's enqueue time a forward with and without graphs, the plain forward's beside;
# it starts cases while fewer than BUDGET_S + DIAG_S seconds have passed, the host-bound T=2048 ones first)
# Session 16 (no GPU) left for the next call: the column-sum variants heavy_first and pipe (--colsum times them),
# the radix final step folded into the token pass (one launch a layer fewer) and the token strings built before the
# end-of-forward waits; ab_prev then holds session 15's final package (0477bfe) for stage 3's before/after, whose
# default cases include the host-bound 135M T=2048.
# .whl holds the wheels the GPU image lacks (pydantic and its needs; see the README's GPU section for the pip
# download line). Stages, each time-boxed so that one failure never loses the others' numbers:
#   1. the CUDA tests: the Triton kernels against float64, the device path against the torch path and eager;
#   2. python -m sinkscope.bench.gpu: the per-layer reductions' variants (--kernels) and the column-sum kernel's
#      (--colsum), each stage going on with its fastest exact one; the device path against the torch path at real
#      shapes (--check); the table: recorder / plain SDPA for the three Llama shapes (bf16, random
#      weights); then, while time lasts, profiler tables (--profile) and the host's share (--host).
set -uo pipefail
OUT=${OUT:-/tmp/sinkscope-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRITON_INTERPRET=0 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || echo "wheel install failed"
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
  echo "THP: $(cat /sys/kernel/mm/transparent_hugepage/enabled 2>&1); defrag: $(cat /sys/kernel/mm/transparent_hugepage/defrag 2>&1); $(nproc) CPUs"
} 2>&1 | tee "$OUT/env.txt"
echo "== 1. CUDA tests"
# TESTS picks a subset (pytest -k); the CUDA tests against eager are in tests/test_recorder.py ("cuda")
timeout "${TEST_S:-120}" python3 -m pytest -q -p no:cacheprovider -rA -k "${TESTS:-not smollm2}" \
  ${TEST_FILES:-tests/test_recorder.py tests/test_kernels.py} > "$OUT/pytest.log" 2>&1
echo "pytest exit $?"; tail -25 "$OUT/pytest.log"
echo "== 2. benchmark"
timeout "${BENCH_S:-350}" python3 -m sinkscope.bench.gpu --out "$OUT" ${FLAGS:---unpack --launch --kernels --colsum --check --profile --host} \
  --budget-s "${BUDGET_S:-270}" --diagnostics-s "${DIAG_S:-30}" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
echo "bench exit $?"
tail -60 "$OUT/bench.log"
if [ -d ab_prev/sinkscope ]; then  # the previous commit's package (carried as ab_prev): the same cases, same machine
  echo "== 3. the previous commit's recorder, same machine"
  (cd ab_prev && PYTHONPATH=/tmp/site:. timeout "${AB_S:-90}" python3 -m sinkscope.bench.gpu --out "$OUT/prev" \
    --cases "${AB_CASES:-llama-3.2-1b:1:8192,smollm2-135m:1:8192,smollm2-135m:1:2048,llama-3.2-1b:1:2048}" \
    --budget-s 70 > "$OUT/prev_bench.log" 2>&1)
  echo "prev exit $?"
  tail -8 "$OUT/prev_bench.log"
fi
