#!/usr/bin/env bash
# Issue 3's GPU measurements in one device call (sized for ~5 min on an H200, well inside the
# 15 min a task is lent): the CUDA tests, the pretraining-step throughput of every frontend
# against transformers in fp32 and bf16, and a torch.profiler pass over each step.
#
#   bench/gpu_session.sh fetch   # here, with PyPI: wheels the device's image lacks, into .whl/
#   bench/gpu_session.sh run     # there: device `run` with carry [".whl"]; results in $OUT
#
# The device image has torch, transformers, numpy, scipy, sentencepiece, pyyaml, tqdm and
# tensorboard but not lhotse and the rest of sslasr's needs; `fetch` downloads those for its
# Python (3.12, x86-64) and `run` installs them into /tmp/site where lhotse is missing. A dry run
# on a CPU machine (`PYTHON=.venv/bin/python OUT=/tmp/gpu bench/gpu_session.sh run`) runs every
# step with one timed iteration; the CUDA tests skip there.
set -uo pipefail
cd "$(dirname "$0")/.."
# sslasr's runtime needs that the image lacks, with what they need in turn
WHEELS=(lhotse==1.33.0 lilcom kaldialign soundfile cffi pycparser audioread cytoolz intervaltree)

fetch() {
  rm -rf .whl && mkdir -p .whl
  local platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
  local python=python3; [ -x .venv/bin/python ] && python=.venv/bin/python
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "${WHEELS[@]}" 2> >(grep -v "is ignored: it is neither" >&2) || exit 1
  ls .whl; du -sh .whl
}

run() {
  local out=${OUT:-bench/gpu_out} python=${PYTHON:-python3}
  [ -n "${PYTHON:-}" ] || [ ! -x .venv/bin/python ] || python=.venv/bin/python  # a user's GPU torch there (README)
  mkdir -p "$out"
  if ! "$python" -c "import lhotse" 2>/dev/null && [ -d .whl ]; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/* || exit 1
    export PYTHONPATH=/tmp/site
  fi
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
  local device=cpu
  "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && device=cuda
  { nvidia-smi -L 2>/dev/null; "$python" -c "import torch, transformers, lhotse
print('torch', torch.__version__, 'transformers', transformers.__version__, 'lhotse', lhotse.__version__)"; } \
    | tee "$out/versions.txt"
  # 1. CUDA tests (skipped without a GPU)
  timeout 150 "$python" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -40 | tee "$out/test_cuda.txt"
  # 2. throughput, fp32 then bf16 (bench/README.md's GPU table), the fp32 run followed by the
  # profile of each step. On a CPU (the dry run) at the tiny size, one timed step. The device
  # returns at most 8 files: the profile's tables come back as one.
  local size=(--config small --batch 16) iters=10 warmup=3 tables=/tmp/gpu_session_profile
  [ "$device" = cpu ] && size=(--config tiny --batch 4) iters=1 warmup=1
  rm -rf "$tables"
  for amp in none bf16; do
    local profile=(); [ "$amp" = none ] && profile=(--profile "$tables")
    timeout 180 "$python" bench/pretrain_throughput.py --frontend all "${size[@]}" --device "$device" \
      --amp "$amp" --iters $iters --warmup $warmup "${profile[@]}" 2>&1 | grep -v "^USDT" | tee "$out/throughput_$amp.txt"
  done
  for table in "$tables"/*.txt; do echo "== $(basename "$table")"; cat "$table"; done > "$out/profile_tables.txt"
}

case ${1:-} in
  fetch) fetch ;;
  run) run ;;
  *) echo "usage: $0 fetch|run" >&2; exit 2 ;;
esac
