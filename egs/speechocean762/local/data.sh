#!/usr/bin/env bash
# Stage 0 of speechocean762: the recipe's Kaldi-style folder data/kaldi/{train,dev,test,unlabeled}
# whose wav.scp names the corpus audio by absolute path (nothing is copied).
#
#   --corpus-dir DIR   a Kaldi-style folder (train/ with wav.scp relative to train/, text,
#                      utt2spk; optional unlabeled/, with text.reference where its transcripts
#                      are known, and test/) or the unpacked OpenSLR release;
#                      empty: the release is downloaded from OpenSLR 101 into downloads/
#   --dev-speakers N   train speakers held out as dev (default 10 of 125: ~200 utterances, 14 min)
#   --test-speakers N  train speakers held out as test when the corpus has no test/ (default 20)
#   --seed N           draws the held-out speakers (default 0)
#   --max-utts N       first N utterances of each split (quick runs and tests)
set -euo pipefail
corpus_dir=""
nj=2           # nothing here is parallel; accepted as every data.sh does
extra_args=()  # --dev-speakers N, ...: checked by sslasr.data.speechocean762 prepare
. "$(dirname "$0")/../../../local/parse_options.sh" "$@"
python=${SSLASR_PYTHON:-../../.venv/bin/python}
if [ -z "$corpus_dir" ]; then
  # The release: train/ and test/ (125 speakers each) with wav.scp paths relative to the
  # release root (WAVE/SPEAKER*/...WAV, 16 kHz); `prepare` reads that layout as it is.
  corpus_dir=$("$python" -m sslasr.data.speechocean762 download --dir downloads)
fi
"$python" -m sslasr.data.speechocean762 prepare --corpus-dir "$corpus_dir" --out-dir data/kaldi "${extra_args[@]}"
echo "$(cd data/kaldi && pwd)" > data/corpus_dir
