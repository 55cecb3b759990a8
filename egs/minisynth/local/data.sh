#!/usr/bin/env bash
# Synthesise minisynth into ./corpus (Kaldi-style train/ unlabeled/ dev/ test/), deterministic
# from --seed. Extra options go to `python -m sslasr.data.minisynth` (--num-train N, ...).
set -euo pipefail
corpus_dir=""
nj=2
extra_args=()  # --num-train N, ...: checked by sslasr.data.minisynth
. "$(dirname "$0")/../../../local/parse_options.sh" "$@"
corpus_dir=${corpus_dir:-corpus}
python=${SSLASR_PYTHON:-../../.venv/bin/python}
"$python" -m sslasr.data.minisynth --out-dir "$corpus_dir" --num-jobs "$nj" "${extra_args[@]}"
mkdir -p data
echo "$(cd "$corpus_dir" && pwd)" > data/corpus_dir
