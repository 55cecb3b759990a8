#!/usr/bin/env bash
# speechocean762 (OpenSLR 101): non-native English read speech of Mandarin-L1 children and
# adults, 16 kHz. Pretrains a frontend on train + unlabeled audio, fine-tunes on --labeled
# seconds of train, trains a letter LM, decodes (greedy, beam, the lexicon-constrained beam, both
# beams also with the LM) and scores dev and test, then one noisy-student generation over the
# unlabeled recordings (and, below --labeled all, the rest of train, its transcripts withheld).
# The release has no unlabeled/: pretraining then uses train alone and the noisy student needs
# --labeled below all (or --generations 0).
# RESULTS.md rows before 2026-12-07 were made with Kaldi's default fbank (filters to 7.6 kHz,
# frames centred on the shift); stage 2 now computes w2v-BERT 2.0's (compute_fbank.SeamlessFbank).
# The same system on the new fbank (2026-12-07, pretraining + 24000-update fine-tuning, `--frontend
# w2vbert --labeled all --compare-scratch false --generations 0 --pretrain-tag _sfbank`, after
# `--stage 2 --stop-stage 2 --force true`): test WER greedy / beam / lexicon / beam + LM /
# lexicon + LM 75.1 / 74.5 / 64.6 / 54.3 / 55.3 % against 73.3 / 72.1 / 63.5 / 54.0 / 53.5 % on
# the old (dev 74.4 / 73.1 / 64.2 / 52.7 / 52.6 against 72.6 / 72.6 / 62.1 / 51.9 / 51.5): level
# within 1-2 points, one run each (exp/ctc_w2vbert_sfbank_all in RESULTS.md). That `_sfbank` row
# is the only one of that first version; the second (2026-12-07 12:30: 16-bit sample scale, so silence is not
# clamped at the energy floor, and frame pairs stacked as transformers stacks them) has none yet.
#   ./run.sh --corpus-dir ../../../shared/data/speechocean762     # a Kaldi-style copy (this machine's):
#       w2v-BERT on all of train, pretrained and scratch, and its noisy student; on 2 cores about
#       10 min of pretraining, 46 min per fine-tuned system (conf/finetune_ctc.yaml), ~7 min
#       decoding each, and the student's own pseudo-labelling, fine-tuning and decoding
#   ./run.sh --generations 0                                     # downloads the release (520 MB; no
#       unlabeled/ in it, so at --labeled all no pool for a noisy student)
#   ./run.sh --stage 5 --stop-stage 10 --labeled 10m              # 10 min / 1h / all of train
#   ./run.sh --labeled 1h --compare-scratch false                # noisy student on unlabeled/ + the rest of train
#   ./run.sh --frontend all --labeled 1h                         # the four frontends in turn, pretrained and
#       scratch, one table: stages 4-10 less the noisy student took 45-50 min per frontend on the
#       2-core machine (conf/frontend_*.yaml) with 6000-update fine-tuning; the 12000 updates of
#       conf/finetune_ctc_1h.yaml since 2026-12-05 add ~15-20 min per fine-tuned system (w2v-BERT
#       33 min against 14-17); each one's noisy student (stage 9) 40-60 min more (w2v-BERT at
#       12000 updates: 43 min)
#   ./run.sh --conf-dir conf/gpu --nproc 4                       # base-size models on GPUs, in exp/conf_gpu/
#   ./run.sh --frontend w2vbert --model-size medium               # 9.7 M parameters (conf/frontend_w2vbert_medium.yaml)
# Splits (local/data.sh): dev = 10 train speakers held out (seeded); test = the corpus's test/
# or, where a copy lacks it (the shared one does), 20 more held-out train speakers. No dev or
# test speaker is in train, and neither is used for pretraining: speakers with unlabeled audio
# (unlabeled/utt2spk, or where it is missing -- the shared copy -- the speaker in the
# utterance id) stay in train. Change with
# --data-opts "--dev-speakers N --test-speakers N --seed N" (then --force true --stage 0).
# RESULTS.md rows before this (2026-12-07 12:00) used a carve that ignored the unlabeled audio's
# speakers: 3 dev and 3 test speakers had 45 of the 245 unlabeled recordings (untranscribed,
# other recordings than the scored ones) in pretraining and in the noisy student's pool. A
# data/ prepared before then keeps that carve until `--stage 0 --force true`.
# Options: see ../../local/ssl_asr.sh (--frontend, --head, --labeled, --no-pretrain, --nproc, ...).
cd "$(dirname "$0")"
corpus=speechocean762
test_sets="dev test"
# Letters (26 + apostrophe + word boundary), as fairseq fine-tunes wav2vec 2.0. Measured on
# this corpus (seed-0 10-minute subset of train, 146 utterances): a 200-piece unigram model
# trained on all of train sees 51 % of its pieces fewer than 5 times in those 10 minutes, and
# such pieces carry 16 % of the dev tokens; of the letters only Q and Z are that rare (0.1 % of
# dev tokens). With 7 letters/s against 50 frames/s, CTC has room for letters.
token_type=char
vocab_size=40
generations=1  # one noisy-student generation over the unlabeled recordings (stage 9)
# w2v-BERT by default: the one frontend that learns here at the CPU sizes (RESULTS.md, dev WER
# with 1 h of labels, beam + LM: w2v-BERT 62.97-68.77 %, HuBERT 83.02, WavLM 85.96, wav2vec 2.0
# 91.48-93.27, the three waveform frontends at 98-99 % greedy; with all of train, w2v-BERT 49.71 %
# at 48000 updates). --frontend wav2vec2 / hubert / wavlm / all choose the others.
frontend=w2vbert
# No speed perturbation by default: measured in conf/finetune_ctc.yaml, it slowed the tiny model
# (greedy dev WER 83.2 % with it, 75.4 % without, 12000 updates on all of train).
. ../../local/ssl_asr.sh
