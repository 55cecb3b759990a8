#!/usr/bin/env bash
# Synthesise minisynth into ./corpus (Kaldi-style train/ unlabeled/ dev/ test/), deterministic
# from --seed. Extra options go to `python -m sslasr.data.minisynth` (--num-train N, ...).
set -euo pipefail
corpus_dir=""
nj=2
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --corpus-dir) corpus_dir=$2; shift 2 ;;
    --nj) nj=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
corpus_dir=${corpus_dir:-corpus}
python=${SSLASR_PYTHON:-../../.venv/bin/python}
"$python" -m sslasr.data.minisynth --out-dir "$corpus_dir" --num-jobs "$nj" "${args[@]}"
mkdir -p data
echo "$(cd "$corpus_dir" && pwd)" > data/corpus_dir
