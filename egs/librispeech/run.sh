#!/usr/bin/env bash
# LibriSpeech 960 h with Libri-Light's limited-resource fine-tuning splits: base-size models
# with the published hyperparameters (conf/*.yaml, each value with its source), for GPUs.
#   ./run.sh --corpus-dir /data/librispeech --stop-stage 3        # already downloaded (see below)
#   ./run.sh --stop-stage 3                                        # downloads into downloads/
#     (add --data-opts "--musan true" to either for WavLM's MUSAN noise: data/ records its options,
#     and a later run with others is refused until --force true prepares it again)
#   ./run.sh --stage 4 --stop-stage 4 --nproc 8                    # wav2vec 2.0 BASE pretraining
#   ./run.sh --stage 5 --labeled 10m --nproc 2                     # fine-tune + decode + score
#   ./run.sh --stage 4 --stop-stage 4 --frontend wavlm --nproc 8   # WavLM, MUSAN noise mixing
#   ./run.sh --stage 5 --labeled 10h --generations 1 --nproc 2     # + noisy student on the rest of the 960 h
#   ./run.sh --stage 2 --stop-stage 4 --frontend w2vbert --nproc 8 # w2v-BERT BASE on fbank (stage 2)
# Multi-node: --launcher "torchrun --nnodes 4 --node_rank $NODE_RANK --master_addr HOST
#   --master_port 29500 --nproc_per_node 8" on every node, NODE_RANK set to its index 0-3 in the shell
#   that runs run.sh (stage 4; the stages before it on one). HuBERT's and WavLM's k-means fits and
#   labels are node 0's work; the other nodes wait for them on the shared exp dir, and stop if
#   node 0's failed (or after --node-wait-hours, 48 by default). With --force true another node
#   takes only node 0's markers made after node 0 started (its start stamp, once it beats; an
#   earlier run's node 0 must have ended).
#   Noisy student (--generations N) the same way, every node with the same options (--decode-opts
#   included: node 0's decoding makes the pseudo-labels the others train on): node 0 decodes the
#   teacher and labels the pool (stages 7-9), the other nodes wait for each generation's
#   pseudo-labels and train the student with it; under --force they take only pseudo-labels made
#   after node 0 started. A node 0 killed outright (kill -9, a crash) leaves no failure marker,
#   but its driver's heartbeat (exp/.node0_alive.<key>, the key a checksum of the torchrun
#   launcher less --node_rank) stops: the others stop --node-silence-seconds (600) after its last
#   beat.
# Batches follow fairseq: pretraining 1.56 h per update = 87.5 s × accum 8 × 8 GPUs (HuBERT /
# WavLM: pretrain_<frontend>.yaml, 0.78 h), fine-tuning 1600 s = 200 s × accum 4 × 2 GPUs; with
# other GPU counts change accum_grad (--pretrain-opts / --finetune-opts trainer.accum_grad=N).
# Each update's gradient is the mean over all its micro-batches' masked frames (or tokens), as
# fairseq's sample-size normalisation: a short micro-batch counts for what it holds.
# Check a config without data or GPUs:
#   ../../.venv/bin/python -m sslasr.bin.train --dry-run --config conf/frontend_wav2vec2.yaml conf/pretrain.yaml --world-size 8
#
# --corpus-dir holds LibriSpeech/<part>/ (OpenSLR 12), librispeech_finetuning/ (Libri-Light's
# librispeech_finetuning.tgz) and, for --musan true, musan/ (OpenSLR 17). Splits: train (960 h,
# pretraining and --labeled all), train_100h, train_10h / train_1h / train_10m (--labeled 10h,
# 1h, 10m: Libri-Light's fixed subsets, not random ones), dev_clean, dev_other (validation),
# test_clean, test_other. Fewer parts: --data-opts "--parts train-clean-100,dev-other,...".
# Options: see ../../local/ssl_asr.sh (--frontend, --head, --labeled, --no-pretrain, ...).
cd "$(dirname "$0")"
corpus=librispeech
test_sets="dev_clean dev_other test_clean test_other"
valid_set=dev_other        # fairseq's valid_subset
whole_splits="train_10m train_1h train_10h"  # Libri-Light's fixed subsets: every utterance kept, whatever its length
pretrain_splits=train      # the 960 h, transcripts unused
token_type=char            # letters, as fairseq's ltr targets
vocab_size=40              # 26 letters, apostrophe, word boundary and the 3 specials: 31 used
. ../../local/ssl_asr.sh
