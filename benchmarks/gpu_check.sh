#!/usr/bin/env bash
# gptlab on a CUDA GPU, checked in one go: about 6 minutes on an H100/H200 (each stage has a time limit; 11 min in all).
#
#   env       nvidia-smi; python, torch, CUDA, cuDNN, NCCL and Triton versions; the device
#   tests     the CUDA-marked tests (tests/test_gpu.py): bf16, fp16 + GradScaler, flash attention through SDPA,
#             torch.compile, fused AdamW, KV-cache generation, NCCL DDP and FSDP on one GPU, resume
#   data      TinyStories (shared/data; generated stories where it is absent) -> GPT-2 tokens (a BPE where
#             shared/data/gpt2_tokenizer is absent) -> token shards, through the gptlab CLI
#   train     the gpt2.5-124m preset, bf16 + torch.compile, a few hundred steps: tokens/s and MFU
#   generate  generation tokens/s with the KV cache (batch 1 and 8; batch 1 with the decode step compiled too)
#             vs recomputing every token
#   profile   where that training step's time goes: its kernels by kind (matmul, attention, fused elementwise,
#             optimizer) and the top ones, and how busy the GPU is between them
#   peak      `gptlab bench peak`: the device's measured matmul rate beside the datasheet's that MFU uses
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run    # the same stages on a CPU in about half a minute: tiny-1m, a BPE
#                                             # of 512, 6 steps, fp32, no compile (CI: tests/test_gpu_check.py)
#
# Every stage's log goes to $OUT (default ./gpu_check_out), with the run's metrics.csv and summary.json:
# 9 files. Shared data is looked for in $GPTLAB_SHARED_DATA, then shared/data inside or beside the checkout;
# $PYTHON (default python3) runs everything.
# The last line is
#   RESULT gpu=... tokens_per_s=... mfu=... gen_tokens_per_s=... tests=passed|failed|skipped
# and the exit code is 1 when any stage failed (each failure is named just before it).
set -euo pipefail

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac

OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # from where the script was started
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
PY=${PYTHON:-python3}
# This checkout's gptlab, installed or not; output as it comes; tqdm's bar redrawn rarely in a log file.
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")  # shards and checkpoints (GBs): not under $OUT
trap 'rm -rf "$WORK"' EXIT

if (( DRY )); then
  DEVICE=cpu ENV_ARGS=(--dry-run)
  DATA_ARGS=(--bytes 200000 --tokenizer bpe --bpe-vocab 512 --workers 1)
  GEN_ARGS=(--tokens 16 --threads 1) PEAK_ARGS=(--seconds 1 --threads 1)
  TRAIN_ARGS=(--model.preset=tiny-1m --model.context_length=64 --train.batch_size=4 --train.max_steps=6
              --train.max_time=60 --train.eval_every=3 --train.eval_batches=2 --train.log_every=1
              --train.warmup_steps=2 --train.precision=fp32 --train.compile=false --train.threads=1)
  LIMIT_TESTS=120 LIMIT_DATA=60 LIMIT_TRAIN=90 LIMIT_GEN=60 LIMIT_PROFILE=60
else
  DEVICE=cuda ENV_ARGS=()
  DATA_ARGS=(--bytes 8000000)
  # 32 x 1024 tokens a step; the first step compiles (about a minute), max_time counts it.
  TRAIN_ARGS=(--model.preset=gpt2.5-124m --train.batch_size=32 --train.grad_accum=1 --train.max_steps=300
              --train.max_time=120 --train.eval_every=150 --train.eval_batches=10 --train.log_every=10
              --train.warmup_steps=30 --train.lr=6e-4 --train.precision=bf16 --train.compile=true
              --train.keep_last=1)
  GEN_ARGS=(--tokens 256 --compiled) PEAK_ARGS=(--seconds 6)
  LIMIT_TESTS=200 LIMIT_DATA=60 LIMIT_TRAIN=160 LIMIT_GEN=100 LIMIT_PROFILE=120
fi

failed=()
stage() {  # stage NAME SECONDS CMD...: CMD under a time limit; its output to the terminal and $OUT/NAME.log
  local name=$1 limit=$2 rc start=$SECONDS
  shift 2
  echo "=== $name (at most ${limit} s): $*"
  set +e
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  set -e
  if (( rc == 0 )); then
    echo "=== $name: ok in $((SECONDS - start)) s"
  else
    (( rc == 124 || rc == 137 )) && echo "=== $name: TIMED OUT after $limit s" || echo "=== $name: FAILED (exit code $rc)"
    failed+=("$name")
  fi
  return "$rc"
}
value() {  # value NAME KEY: KEY's value on the last line of $OUT/NAME.log, or na
  local found
  found=$(tail -n 1 "$OUT/$1.log" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p")
  echo "${found:-na}"
}

stage env 30 "$PY" benchmarks/gpu_check.py env "${ENV_ARGS[@]}" || true
gpu=$(value env gpu)

tests=failed
if stage tests "$LIMIT_TESTS" "$PY" -m pytest -q -p no:cacheprovider -rs -m cuda tests/test_gpu.py; then
  tests=passed
  if (( ! DRY )) && grep -q "skipped" "$OUT/tests.log"; then  # on a GPU every one of them must run
    tests=skipped
    failed+=(tests)
  fi
fi

tokens_per_s=na mfu=na gen_tokens_per_s=na
if stage data "$LIMIT_DATA" "$PY" benchmarks/gpu_check.py data --work "$WORK" "${DATA_ARGS[@]}"; then
  RUN="$WORK/run"
  stage train "$LIMIT_TRAIN" "$PY" -m gptlab train --data-dir "$(value data data_dir)" --run "$RUN" \
    "--model.vocab_size=$(value data vocab_size)" "--train.device=$DEVICE" "${TRAIN_ARGS[@]}" && trained=1 || trained=0
  for file in metrics.csv summary.json; do  # also what a failed run left
    [[ -f "$RUN/$file" ]] && cp "$RUN/$file" "$OUT/"
  done
  if (( trained )); then
    # the report goes at the end of train.log, so that its last line holds the values
    "$PY" benchmarks/gpu_check.py report "$RUN" 2>&1 | tee -a "$OUT/train.log" || failed+=(report)
    tokens_per_s=$(value train tokens_per_s) mfu=$(value train mfu)
    stage generate "$LIMIT_GEN" "$PY" benchmarks/gpu_check.py generate "$RUN" --device "$DEVICE" "${GEN_ARGS[@]}" \
      && gen_tokens_per_s=$(value generate gen_tokens_per_s) || true
    stage profile "$LIMIT_PROFILE" "$PY" benchmarks/gpu_check.py profile "$RUN" || true
  fi
fi || true
stage peak 30 "$PY" -m gptlab bench peak --device "$DEVICE" "${PEAK_ARGS[@]}" || true

(( ${#failed[@]} )) && echo "FAILED: ${failed[*]} (logs in $OUT)" || echo "all stages passed (logs in $OUT)"
echo "RESULT gpu=$gpu tokens_per_s=$tokens_per_s mfu=$mfu gen_tokens_per_s=$gen_tokens_per_s tests=$tests"
(( ${#failed[@]} == 0 ))
