#!/usr/bin/env bash
# Stage 0 of LibriSpeech: Kaldi-style splits in data/kaldi/ (train = 960 h, train_100h,
# Libri-Light's train_10h / train_1h / train_10m, dev_clean, dev_other, test_clean,
# test_other) naming the FLAC files by absolute path, through lhotse's LibriSpeech recipe;
# with --musan true also MUSAN noise cuts (data/noise/musan_cuts.jsonl.gz) for WavLM.
#
#   --corpus-dir DIR   already downloaded: DIR/LibriSpeech/<part>/, DIR/librispeech_finetuning/
#                      (and DIR/musan/ for --musan true); empty: everything is downloaded into
#                      downloads/ (LibriSpeech ~60 GB from OpenSLR 12, librispeech_finetuning.tgz
#                      from Libri-Light, MUSAN ~11 GB from OpenSLR 17)
#   --parts P,P,...    LibriSpeech parts, comma-separated (default: all seven)
#   --musan true|false prepare MUSAN's noise part for WavLM's utterance mixing (default false)
set -euo pipefail
corpus_dir=""
nj=2
parts=train-clean-100,train-clean-360,train-other-500,dev-clean,dev-other,test-clean,test-other
musan=false
. "$(dirname "$0")/../../../local/parse_options.sh" "$@"
case $musan in true|false) ;; *) echo "$0: --musan $musan: true or false" >&2; exit 2 ;; esac
python=${SSLASR_PYTHON:-../../.venv/bin/python}
parts=${parts//,/ }
if [ -z "$corpus_dir" ]; then
  corpus_dir=downloads
  "$python" -m sslasr.data.librispeech download --dir "$corpus_dir" --parts $parts \
    $([ "$musan" = true ] && echo --musan)
fi
"$python" -m sslasr.data.librispeech prepare --root "$corpus_dir" --out-dir data/kaldi --parts $parts --num-jobs "$nj"
if [ "$musan" = true ]; then
  "$python" -m sslasr.data.librispeech noise --musan-dir "$corpus_dir/musan" --out data/noise/musan_cuts.jsonl.gz
fi
echo "$(cd data/kaldi && pwd)" > data/corpus_dir
