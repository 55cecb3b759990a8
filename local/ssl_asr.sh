#!/usr/bin/env bash
# Shared stage driver for every corpus (the analog of ESPnet's asr.sh, kept short).
# A corpus's run.sh sets `corpus`, `test_sets`, `conf_dir` defaults and sources this file;
# it supplies only `local/data.sh` (stage 0) and `conf/*.yaml`.
#
#   0 data        corpus-specific preparation into a Kaldi-style folder (local/data.sh)
#   1 manifests   lhotse recordings/supervisions/cuts, validated (bad audio dropped, counted)
#   2 features    fbank for fbank frontends; waveform frontends read audio on the fly
#   3 tokenizer   sentencepiece (--token-type, --vocab-size) on the training transcripts
#   4 pretrain    self-supervised pretraining of --frontend on --pretrain-splits (train +
#                 unlabeled); a frontend with k-means targets (HuBERT) runs per iteration:
#                 k-means, labels, pretraining
#   5 finetune    --head on --labeled seconds of transcribed audio, from the pretrained
#                 encoder and (unless --compare-scratch false) from scratch
#   6 lm          token LM (conf/lm.yaml) on the training transcripts (+ --lm-text files)
#   7 decode      every test set with every fine-tuned system and every decoding method of
#                 the head's `decode` section, one process per system; LM methods: λ, β
#                 tuned on the validation set, then used for every set
#   8 score       kaldialign WER; one JSON line per result in exp/results.jsonl; the pretrained
#                 system's rows carry the paired-bootstrap difference to the scratch one's
#                 (a student's, in stage 9, to its teacher's): sslasr.bin.compare_wer
#   9 noisy student, --generations N (0: skipped): the teacher transcribes the unlabeled pool,
#                 the pseudo-labels are filtered (conf/noisy_student[_<labeled>].yaml), a student trains on
#                 labels + pseudo-labels with noise, is decoded and scored, and teaches the next
#  10 results     exp/results.jsonl's new rows appended to RESULTS.jsonl (tracked: every run's
#                 rows), RESULTS.md rendered from it
# Outputs of stages 4-9 go under exp/, or exp/conf_<name>/ for another --conf-dir (see $exp);
# stage 10 writes the recipe's RESULTS.jsonl and RESULTS.md, which every --conf-dir shares.
# Stages 0-7 and 9 leave .done markers and skip what they mark; stage 8 scores each decoding once
# (decode_*/.scored), stage 10 renders on every run (--force true redoes a stage's work:
# training from update 0, its logs appended to); training stages resume from their last
# checkpoint after a kill. A training dir (stages 4, 5, 9) records what it is made from in
# inputs.txt; reused or resumed from other inputs, it is refused (see made_from).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
command_line="./run.sh"; [ $# -eq 0 ] || command_line+=$(printf " %q" "$@")  # re-runnable: quoting kept

# The options a corpus's run.sh may preset are read below as ${name:-default}. A variable of
# the same name exported in the user's shell would pass for such a preset and change the recipe
# unseen (a run.sh's own presets are plain, unexported shell variables), so it is refused.
for preset in corpus frontend speed_perturb generations finetune_jobs vocab_size token_type data_opts \
              conf_dir test_sets pretrain_splits valid_set whole_splits; do
  if [[ "$(declare -p "$preset" 2>/dev/null | cut -d' ' -f2)" == *x* ]]; then
    echo "$0: '$preset' is exported in the environment, where it would silently set --${preset//_/-}; unset it and pass --${preset//_/-} instead" >&2
    exit 2
  fi
done

# ---------------------------------------------------------------- options
stage=0
stop_stage=100
frontend=${frontend:-wav2vec2}  # wav2vec2, hubert, wavlm, w2vbert (a corpus's run.sh may set its own); `all`: each in turn, one table
model_size=""          # another size of the frontend: conf/frontend_<frontend>_<size>.yaml (exp dirs <frontend>_<size>)
head=ctc
labeled=all            # seconds of labeled audio (600, 1h, 10m) or "all"
speed_perturb=${speed_perturb:-}  # e.g. "0.9 1.1": fine-tune on the labeled cuts plus copies at these speeds
no_pretrain=false      # scratch baseline only
init_from=""           # a transformers model directory (wav2vec2, hubert, ...): imported, not pretrained
compare_scratch=true   # also fine-tune a scratch system with the same head and labels
generations=${generations:-0}  # noisy-student generations (stage 9)
finetune_jobs=${finetune_jobs:-1}  # systems fine-tuned at once, sharing the cores (small models on few cores gain)
corpus_dir=""
nj=2
nproc=1                # processes per node for training (torchrun when > 1)
launcher=""            # e.g. "torchrun --nnodes 2 --node_rank 0 --master_addr host --nproc_per_node 8"
node_wait_hours=48     # multi-node: how long the other nodes wait for node 0's k-means work (stage 4) or pseudo-labels (9)
node_silence_seconds=600  # multi-node: the others stop when node 0's driver has not beaten for this long
force=false
vocab_size=${vocab_size:-200}
token_type=${token_type:-unigram}  # sentencepiece model: unigram, bpe or char
data_opts=${data_opts:-}  # extra options for local/data.sh
pretrain_opts=""       # extra `key=value` config overrides for stage 4
kmeans_opts=""         # ... for the k-means of frontends with k-means targets (HuBERT), e.g. kmeans.frames_budget=20000
finetune_opts=""       # ... for stage 5 (and the noisy students of stage 9)
tag=""                 # suffix of the fine-tuned systems' and noisy students' exp dirs, for variants side
                       #   by side, e.g. --tag _seed1 --finetune-opts trainer.seed=1 (pretraining and LM shared)
pretrain_tag=""        # suffix of the pretraining's exp dir (and of the systems fine-tuned from it), for
                       #   pretraining variants side by side, e.g. --pretrain-tag _12k --pretrain-opts trainer.max_updates=12000
lm_text=""             # extra LM training text files (one sentence a line), space-separated
lm_opts=""             # extra `key=value` config overrides for stage 6
decode_opts=""         # extra options for sslasr.bin.decode, e.g. a wider λ grid for decoded systems:
                       #   --stage 7 --stop-stage 8 --force true --decode-opts "--tune-lm-weights 0.6 1 1.5 2" (then --stage 10)
python=${SSLASR_PYTHON:-$root/.venv/bin/python}
conf_dir=${conf_dir:-conf}  # another (e.g. conf/gpu) trains in its own exp root: exp/conf_gpu (see $exp below)
corpus=${corpus:?run.sh must set corpus}
test_sets=${test_sets:-"dev test"}
pretrain_splits=${pretrain_splits:-"train unlabeled"}
valid_set=${valid_set:-dev}  # validation during training and LM/fusion tuning
whole_splits=${whole_splits:-}  # splits stage 1 keeps whole (no duration limits) beside test_sets and valid_set: fixed labeled subsets

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d'; sed -n '/^# -* options/,/^usage()/p' "${BASH_SOURCE[0]}" | sed '1d;$d'; }
. "$root/local/parse_options.sh" "$@"
for option in stage stop_stage generations finetune_jobs nj nproc vocab_size node_wait_hours node_silence_seconds; do
  # a word where a count belongs would only make bash's [ -gt ] complain, and the stages go on
  [[ "${!option}" =~ ^[0-9]+$ ]] || { echo "$0: --${option//_/-} ${!option}: not a whole number" >&2; exit 2; }
done
if [ -n "$launcher" ] && [ "$nproc" -gt 1 ]; then  # the launcher's own count ran, --nproc unsaid
  echo "$0: --nproc $nproc and --launcher contradict: give the processes per node in the launcher (torchrun's --nproc_per_node)" >&2
  exit 2
fi
# (a 30s or 1.5h failed in stage 5, after pretraining; 010m read as octal, 480 s)
[[ "$labeled" =~ ^(all|[0-9]+[hm]?)$ ]] || { echo "$0: --labeled $labeled: all, or N, Nm or Nh (seconds, minutes, hours)" >&2; exit 2; }
for f in $lm_text; do  # (a missing one was recorded without contents, and the LM trained on it reset)
  [ -f "$f" ] && [ -r "$f" ] || { echo "$0: --lm-text $f: no readable file (relative paths are read from $PWD)" >&2; exit 2; }
done
for option in force no_pretrain compare_scratch; do
  # compared with `true` only: `--force yes` meant false, and `--force --labeled 1h` took --labeled for its value
  case ${!option} in true|false) ;; *) echo "$0: --${option//_/-} ${!option}: true or false" >&2; exit 2 ;; esac
done
for owned in --model --cuts --methods --out-dir --lm --lexicon --tune-on --overwrite --confidence; do
  # the driver's own: given again, the last one wins (e.g. --tune-on test: λ, β tuned on the test set)
  case " $decode_opts " in *" $owned "*|*" $owned="*)
    echo "$0: --decode-opts '$decode_opts': $owned is the driver's to set (sets, methods, LM, tuning on --valid-set)" >&2
    exit 2 ;; esac
done

# the install, where it is missing or older than pyproject.toml (a .venv made for one's own torch
# first, a dependency added since): with its stamp in place this costs nothing. Under a lock: the
# nodes of a multi-node run share the checkout, and each would pip-install into one .venv at once
# (the ones that waited find the stamp made)
# (the stamp names the .venv's Python: one upgraded in place since has lost its packages)
install_stamp=$root/.venv/.sslasr-installed
if [ ! -x "$python" ] || { [ -z "${SSLASR_PYTHON:-}" ] \
    && { [ ! -f "$install_stamp" ] || [ "$root/pyproject.toml" -nt "$install_stamp" ] \
         || [ "$(cat "$install_stamp")" != "python $("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" ]; }; }; then
  if command -v flock >/dev/null; then
    mkdir -p "$root/.venv" && flock "$root/.venv/.install.lock" "$root/tools/install.sh"
  else
    "$root/tools/install.sh"
  fi
fi
export PYTHONUNBUFFERED=1 SSLASR_PYTHON="$python"

# A stage left out of --stage..--stop-stage is taken as done: one whose input was made again since
# (stage 0 alone under --force, then --stage 4) would hand its stale outputs on to the next stages
stale_before() {  # stale_before STAGE NEWER OLDER WHAT [HOW]: stop when STAGE is left out but OLDER predates NEWER
  [ "$stage" -gt "$1" ] && [ -f "$3" ] && [ "$2" -nt "$3" ] || return 0
  echo "$0: $4: include stage $1 ${5:-(--stage $1)}" >&2
  exit 2
}
unfinished() {  # unfinished STAGE MARKER WHAT [HOW]: stop when STAGE is left out but its folder has no MARKER
  # (--force, and stage 2 always, remove a marker before the work is redone in place: a run killed
  # part-way leaves none)
  [ "$stage" -gt "$1" ] && [ -d "$(dirname "$2")" ] && [ ! -f "$2" ] || return 0
  echo "$0: stage $1 has not finished $3 (no $2: killed part-way?): include stage $1 ${4:-(--stage $1)}" >&2
  exit 2
}

manifests=data/manifests
if [ "$frontend" = all ]; then
  # The same command once per frontend (data, tokenizer and LM are made by the first and reused),
  # each result row recording the single-frontend command that reproduces it.
  [ -z "$init_from" ] || { echo "$0: --frontend all and --init-from contradict (the checkpoint has one frontend)" >&2; exit 2; }
  if [ "$force" = true ] && [ "$stage" -le 3 ]; then
    echo "$0: --frontend all --force true would redo stages 0-3 once per frontend; run them alone first" \
      "(stage 2 with an fbank frontend, e.g. --frontend w2vbert), then --stage 4" >&2
    exit 2
  fi
  # an fbank frontend's own check (below) would stop the run at that frontend, after the ones
  # before it trained: said now
  stale_before 2 $manifests/.done $manifests/.fbank.done "the manifests were made again after the fbank" \
    "with an fbank frontend first (--frontend w2vbert --stage 2 --stop-stage 2)"
  unfinished 1 $manifests/.done "the manifests"  # (stage 2's marker sits in stage 1's folder)
  unfinished 2 $manifests/.fbank.done "the fbank" "with an fbank frontend first (--frontend w2vbert --stage 2 --stop-stage 2)"
  unset SSLASR_SHARED_MADE  # set below, for the frontends after the first
  one_frontend_args=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --frontend) shift 2 ;;
      --frontend=*) shift ;;
      *) one_frontend_args+=("$1"); shift ;;
    esac
  done
  end_frontend() {  # end_frontend CODE: TERM to the frontend's driver and its trainers (any signal of ours)
    [ -z "$child" ] || { kill -TERM -- -$child 2>/dev/null || :; wait $child 2>/dev/null || :; }
    exit $1
  }
  frontends=$("$python" -c "from sslasr.models.frontends import FRONTENDS; print(*FRONTENDS)")  # a failure stops here
  for one in $frontends; do  # (said at the first frontend without one, after the ones before it trained)
    [ -z "$model_size" ] || [ -f "$conf_dir/frontend_${one}_$model_size.yaml" ] \
      || { echo "$0: --frontend all --model-size $model_size: no $conf_dir/frontend_${one}_$model_size.yaml" >&2; exit 2; }
  done
  for one in $frontends; do
    one_command=("./$(basename "$0")" ${one_frontend_args[@]+"${one_frontend_args[@]}"} --frontend "$one")
    echo "$(date '+%F %T') --frontend all:$(printf " %q" "${one_command[@]}")" >&2
    # in its own process group (set -m), waited for: a TERM (a scheduler's) or HUP killed this shell
    # and left the frontend's driver and its trainer running on; passed on to them all, as Ctrl-C is
    child=""
    trap 'end_frontend 130' INT; trap 'end_frontend 143' TERM; trap 'end_frontend 129' HUP
    set -m; "${one_command[@]}" & child=$!; set +m
    wait $child || exit $?
    trap - INT TERM HUP
    export SSLASR_SHARED_MADE=1  # the LMs are the first frontend's: reused, not trained again under --force
  done
  exit 0
fi

log() { echo "$(date '+%F %T') [stage ${current_stage:-?}] $*" >&2; }
run_stage() {  # run_stage N: true when stage N is inside --stage..--stop-stage
  current_stage=$1
  [ "$1" -ge "$stage" ] && [ "$1" -le "$stop_stage" ]
}
done_or_force() {  # done_or_force MARKER: true (skip) when the work behind MARKER is done
  if [ "$force" = true ]; then rm -f "$1"; return 1; fi
  [ -f "$1" ]
}
note_command() {  # note_command DIR WHAT: this invocation did WHAT in DIR (results rows name every command that made them)
  [ "${node_rank:-0}" = 0 ] || return 0  # one note per multi-node run
  mkdir -p "$1" && printf '%s\t%s\t%s\n' "$(date +%s)" "$2" "$command_line" >> "$1/commands.txt"
}
row_command() {  # row_command DIR...: the distinct commands of DIRs' commands.txt and this one (scoring), in time order
  "$python" - "$command_line" "$@" <<'EOF'
import sys
import time
from pathlib import Path
notes = []  # (time, what, command)
for directory in sys.argv[2:]:
    path = Path(directory) / "commands.txt"
    for line in path.read_text().splitlines() if path.is_file() else []:
        fields = line.split("\t", 2)
        if len(fields) == 3 and fields[0].isdigit():  # a line torn by concurrent appends is left out
            notes.append((int(fields[0]), fields[1], fields[2]))
notes.append((int(time.time()), "scored", sys.argv[1]))
did = {}  # command → what it did, commands in the order they first did something
for _, what, command in sorted(notes, key=lambda note: note[0]):
    did.setdefault(command, {})[what] = None
if len(did) == 1:  # one invocation did it all: the command alone, as it was typed
    print(sys.argv[1])
else:
    print("\n".join(f"{command}  # {', '.join(whats)}" for command, whats in did.items()))
EOF
}
supersede_commands() {  # supersede_commands DIR...: DIR's work is redone: the commands noted so far made what
  local dir                 # is replaced, so rows no longer name them (kept in commands.superseded.txt)
  for dir in "$@"; do supersede_notes "$dir"; done
}
supersede_notes() {  # supersede_notes DIR [WHAT]: DIR's notes (those of WHAT, e.g. decoded) to commands.superseded.txt
  local dir=$1 what=${2:-}
  [ "${node_rank:-0}" = 0 ] && [ -f "$dir/commands.txt" ] || return 0
  awk -F'\t' -v what="$what" 'what == "" || $2 == what' "$dir/commands.txt" >> "$dir/commands.superseded.txt"
  awk -F'\t' -v what="$what" 'what != "" && $2 != what' "$dir/commands.txt" > "$dir/commands.txt.tmp"
  mv -f "$dir/commands.txt.tmp" "$dir/commands.txt"
}
reset_training() {  # reset_training EXP_DIR...: the next training there starts from update 0
  local dir
  for dir in "$@"; do  # the logs stay (appended to): the earlier run's remain readable
    rm -rf $dir/.done $dir/checkpoint_last.pt $dir/model_{final,best,valid_*}.pt $dir/tensorboard \
      $dir/.decode.done $dir/decode_*  # decodes of the old model
  done
  supersede_commands "$@"
}
fresh_training() {  # fresh_training EXP_DIR...: with --force, train from update 0, not resume the old checkpoint
  [ "$force" != true ] || reset_training "$@"
}
train() {  # train EXP_DIR CONFIG... -- OVERRIDES...
  local exp_dir=$1; shift
  if [ -n "$launcher" ]; then
    local launch=($launcher)  # a bare torchrun: the install's, where none is on PATH (no venv activated)
    [ "${launch[0]}" != torchrun ] || command -v torchrun > /dev/null || launch[0]=$(dirname "$python")/torchrun
    "${launch[@]}" -m sslasr.bin.train --exp-dir "$exp_dir" "$@"
  elif [ "$nproc" -gt 1 ]; then
    "$(dirname "$python")/torchrun" --standalone --nproc_per_node "$nproc" -m sslasr.bin.train --exp-dir "$exp_dir" "$@"
  else
    "$python" -m sslasr.bin.train --exp-dir "$exp_dir" "$@"
  fi
}
seconds_of() {  # 10m → 600, 1h → 3600, 90 → 90, all → all
  case "$1" in
    all) echo all ;;
    *h) echo $(( 10#${1%h} * 3600 )) ;;
    *m) echo $(( 10#${1%m} * 60 )) ;;
    *) echo $(( 10#$1 )) ;;
  esac
}

lang=data/lang_${token_type}_${vocab_size}
labeled_seconds=$(seconds_of "$labeled")
labeled_tag=$labeled
sp_tag=""; [ -z "$speed_perturb" ] || sp_tag=_sp$(echo $speed_perturb | tr ' ' '-')  # _sp0.9-1.1
for suffix in tag pretrain_tag; do
  case "${!suffix}" in *[!A-Za-z0-9._-]*)
    echo "$0: --${suffix//_/-} '${!suffix}': only letters, digits, '.', '_' and '-'" >&2; exit 2 ;; esac
done
frontend_tag=$frontend${model_size:+_$model_size}  # names the exp dirs
frontend_conf=$conf_dir/frontend_$frontend_tag.yaml
if [ -n "$model_size" ] && [ -z "$init_from" ] && [ ! -f "$frontend_conf" ]; then
  echo "$0: --model-size $model_size: no $frontend_conf" >&2; exit 2
fi
if [ -n "$init_from" ]; then  # the checkpoint's architecture and family, not conf/frontend_*.yaml's
  [ -f "$init_from/config.json" ] || { echo "$0: --init-from $init_from: no config.json there" >&2; exit 2; }
  [ "$no_pretrain" != true ] || { echo "$0: --init-from and --no-pretrain true contradict" >&2; exit 2; }
  [ -z "$model_size" ] || { echo "$0: --init-from and --model-size contradict (the checkpoint sets the size)" >&2; exit 2; }
  init_from=$(cd "$init_from" && pwd)
  # the family, once config.json converts: an unsupported option stops here, not after stages 0-3
  imported=$("$python" -c "import sys; from sslasr.models.hf_import import checked_frontend_name
try: print(checked_frontend_name(sys.argv[1]))
except (ValueError, FileNotFoundError) as e: sys.exit(f'$0: --init-from {sys.argv[1]}: {e}')" "$init_from") || exit 2
  case " $command_line " in *" --frontend"*) [ "$frontend" = "$imported" ] || {
    echo "$0: --frontend $frontend, but --init-from $init_from holds a $imported model" >&2; exit 2; } ;; esac
  frontend=$imported
  frontend_tag=${frontend}_imported_$(basename "$init_from" | tr -c 'A-Za-z0-9._\n-' '_')
  input_type=$("$python" -c "import sys; from sslasr.models.frontends import get_frontend
print(get_frontend({'name': sys.argv[1]}).input_type)" "$frontend")
else
input_type=$("$python" -c "
from sslasr.models.frontends import get_frontend
from sslasr.utils.config import load_config
print(get_frontend(load_config('$frontend_conf')['frontend']).input_type)")
fi
[ "$input_type" = fbank ] && feats=_fbank || feats=""
cuts() { echo "$manifests/${corpus}_cuts_$1$feats.jsonl.gz"; }

systems=""
[ "$no_pretrain" = true ] || systems="pretrained"
{ [ "$no_pretrain" = true ] || [ "$compare_scratch" = true ]; } && systems="$systems scratch"
# Models of another --conf-dir must not resume or overwrite the default one's: their exp root is
# exp/conf_<the dir without a leading conf/, other characters than [A-Za-z0-9._-] as _>
exp=exp
conf_name=${conf_dir#./}; conf_name=${conf_name%/}
[ "$conf_name" = conf ] || exp=exp/conf_$(printf %s "${conf_name#conf/}" | tr -c 'A-Za-z0-9._-' '_')
pretrained_tag=$frontend_tag$pretrain_tag  # names the pretraining and what starts from it
for sized in "$conf_dir"/frontend_${frontend}_*.yaml; do  # (--force would overwrite the other run)
  size=${sized##*/frontend_${frontend}_}; size=${size%.yaml}
  # another size S names pretrain_<frontend>_S<its tag>: ours, when ours begins so
  if [ -n "$pretrain_tag" ] && [ -f "$sized" ] && [ "$size" != "$model_size" ] \
      && [[ "$pretrained_tag" == "${frontend}_$size"* ]]; then
    echo "$0: --pretrain-tag $pretrain_tag names exp dirs of --model-size $size ($sized): choose another tag" >&2
    exit 2
  fi
done
pretrain_dir=$exp/pretrain_$pretrained_tag
system_dir() {  # system_dir pretrained|scratch
  if [ "$1" = pretrained ]; then echo "$exp/${head}_${pretrained_tag}_${labeled_tag}$sp_tag$tag"; else echo "$exp/${head}_scratch_${frontend_tag}_${labeled_tag}$sp_tag$tag"; fi
}

# A multi-node --launcher (torchrun --nnodes 2 --node_rank N) runs this driver on every node:
# stages 4-6 train on all of them; stages 7, 8 and 10 (decoding into shared folders, results
# rows) are node 0's alone. In stage 9 node 0 decodes and pseudo-labels, and every node trains
# the students (the other nodes wait for each generation's pseudo-labels on the shared exp dir).
node_rank=$(printf '%s\n' "$launcher" | sed -n 's/.*--node[_-]rank[= ]*\([0-9][0-9]*\).*/\1/p')
nnodes=$(printf '%s\n' "$launcher" | sed -n 's/.*--nnodes[= ]*\([0-9:][0-9:]*\).*/\1/p')
if [ -z "$node_rank" ] && [ "${nnodes:-1}" != 1 ]; then  # (a rendezvous would rank the nodes: not the driver)
  echo "$0: --launcher runs $nnodes nodes but names no --node_rank: every node would take itself for node 0" \
    "(k-means, decoding and results rows are node 0's alone); give each node's launcher its --node_rank N" >&2
  exit 2
fi
node_rank=${node_rank:-0}
noisy_student_dir=$exp/noisy_student_$(basename "$(system_dir pretrained)")  # stage 9's
# Node 0 beats (touches $node0_alive every 30 s) while its driver runs: killed outright (SIGKILL, a
# lost machine) it leaves no .node0_failed, and the waiting nodes would wait --node-wait-hours.
# They compare the beat with a file they touch ($node_probe): both times are the shared
# filesystem's clock; a beat from before a node started (an earlier run's) is not this run's.
# One beat per run: named by its launcher less --node_rank (the same on every node of a run, and
# another run in this exp root, with its own master address or port, beats in its own file).
run_key=$(printf '%s' "$launcher" | sed -E 's/--node[_-]rank[= ]*[0-9]+//' | cksum | cut -d' ' -f1)
node0_alive=$exp/.node0_alive.$run_key
node_probe=$exp/.node${node_rank}_probe
node_started=""
# Under --force node 0 redoes its shared work in place (the pretraining manifest, k-means, pseudo-
# labels): the earlier run's markers are there until it removes them, maybe after another node
# looked. It touches $node0_started as it starts, before removing any; the other nodes take only
# markers newer than that, once a beat since they started shows it is this run's node 0.
node0_started=$exp/.node0_started.$run_key
forced_since=""  # set by node0_run_start
node0_exit() {  # node 0's EXIT trap: a failure (a refusal included) left where the waiting nodes look
  # (not a kill by a signal without a trap: the beat's silence stops them then)
  local rc=$?
  [ $rc -ne 0 ] || return 0
  [ -z "${noisy_student_multinode:-}" ] || touch $noisy_student_dir/.node0_failed || :
  [ -z "${node0_failed:-}" ] || { mkdir -p "$(dirname "$node0_failed")" && touch "$node0_failed"; } || :
}
if [ "${nnodes:-1}" != 1 ]; then
  mkdir -p $exp
  if [ "$node_rank" = 0 ]; then  # the loop ends with the driver ($$), whatever ends it
    trap node0_exit EXIT
    touch "$node0_started"
    ( while kill -0 $$ 2>/dev/null; do touch "$node0_alive" || :; sleep 30; done ) </dev/null >/dev/null 2>&1 &
  else
    touch "$node_probe"
    node_started=$(stat -c %Y "$node_probe")
    touch "$exp/.node${node_rank}_started.$run_key"  # (for node0_run_start: to the nanosecond, not the second)
  fi
fi
node0_run_start() {  # node0_run_start: under --force, on another node, forced_since=node 0's start stamp of this run
  [ "$force" = true ] && [ "$node_rank" != 0 ] && [ -z "$forced_since" ] || return 0
  local waited=0
  # (a beat in this node's second, or before it, may be an earlier run's last; that run must have ended)
  until [ -f "$node0_started" ] && [ "$node0_alive" -nt "$exp/.node${node_rank}_started.$run_key" ]; do
    if [ $waited -ge $((node_wait_hours * 3600)) ]; then
      log "node $node_rank: node 0 of this run has not started (no beat in $node0_alive since this node started)," \
          "after $node_wait_hours h (--node-wait-hours)"
      exit 1
    fi
    [ $((waited % 600)) -ne 0 ] || log "node $node_rank: waiting for node 0 to start ($node0_alive)"
    sleep 5
    waited=$((waited + 5))
  done
  forced_since=$node0_started
}
noisy_student_multinode=""
started_stamp=""  # on the shared filesystem, by its clock (see wait_for_node_0)
if [ "${nnodes:-1}" != 1 ] && [ "$generations" -gt 0 ] && [ "$stage" -le 9 ] && [ "$stop_stage" -ge 9 ]; then
  # From the start: node 0 marks any failure of its (the other nodes wait in stage 9 for work of
  # node 0 alone: the teacher's decodes, the labelling), and the others stamp when they started.
  # Under --force, start the nodes together: node 0's pseudo-labels count when newer than a stamp.
  noisy_student_multinode=1
  mkdir -p $noisy_student_dir
  if [ "$node_rank" = 0 ]; then
    rm -f $noisy_student_dir/.node0_failed  # (node0_exit marks a failure of this run)
  else
    started_stamp=$noisy_student_dir/.node${node_rank}_started
    touch $started_stamp
  fi
fi

# Work that records its inputs (data/.data.done, a training dir's or an LM's inputs.txt) says
# what changed when they differ: the recorded lines (<) against these (>), on one line.
changed_inputs() { diff "$1" <(printf '%s\n' "$2") | grep '^[<>]' | tr '\n' ' '; }  # changed_inputs RECORD INPUTS
data_inputs() { printf 'corpus_dir %s\ndata_opts %s\n' "$corpus_dir" "$data_opts"; }  # what stage 0 made data/ from
if run_stage 0; then
  # --corpus-dir given once: later commands (a recipe header's) leave it out
  recorded_corpus=$( { [ -s data/.data.done ] && sed -n 's/^corpus_dir //p' data/.data.done; } || :)
  if [ -z "$corpus_dir" ] && [ -n "$recorded_corpus" ]; then
    corpus_dir=$recorded_corpus
    log "--corpus-dir $corpus_dir (data/.data.done's)"
  fi
  # data/ made from other inputs (e.g. --data-opts "--max-utts 50" before) is refused, not reused;
  # a marker without inputs predates their recording and is taken as it is
  if [ -s data/.data.done ] && [ "$force" != true ] && [ "$(data_inputs)" != "$(cat data/.data.done)" ]; then
    log "data/ was prepared from other inputs: $(changed_inputs data/.data.done "$(data_inputs)")"
    log "pass --force true to prepare it again from these (--stop-stage 0: stage 0 alone), or the inputs it was made with"
    exit 2
  fi
  if done_or_force data/.data.done; then
    log "data ready (data/.data.done$([ -s data/.data.done ] || echo ', made before inputs were recorded: not checked'))"
  else
    log "preparing the corpus"
    supersede_commands data
    # data.sh rewrites data/ in place: until the marker, a kill leaves .data.started (checked below)
    mkdir -p data && touch data/.data.started
    ./local/data.sh --corpus-dir "$corpus_dir" --nj "$nj" $data_opts
    data_inputs > data/.data.done.tmp && mv data/.data.done.tmp data/.data.done && rm -f data/.data.started
    note_command data "data prepared"
  fi
fi
if [ -f data/.data.started ] && [ -f data/.data.done ]; then  # (stage 0 runs only without the marker,
  rm -f data/.data.started  # which --force removes first: both here, it was killed between the two: finished)
elif [ "$stage" -gt 0 ] && [ -f data/.data.started ]; then  # (its earlier manifests would pass for current)
  echo "$0: stage 0 has not finished data/ (data/.data.started: killed part-way?): include stage 0 (--stage 0)" >&2
  exit 2
fi
# local/data.sh tells where the Kaldi-style folder it prepared is (--corpus-dir was its input)
if [ -f data/corpus_dir ]; then corpus_dir=$(cat data/corpus_dir); fi

recorded_splits() {  # recorded_splits: the splits stage 1 made manifests of (named by their recordings manifests)
  local f split
  for f in $manifests/${corpus}_recordings_*.jsonl.gz; do
    [ -e "$f" ] || continue
    split=${f#$manifests/${corpus}_recordings_}
    echo "${split%.jsonl.gz}"
  done
}
unfinished 1 $manifests/.done "the manifests"
stale_before 1 data/.data.done $manifests/.done "data/ was prepared again after the manifests"
[ "$input_type" != fbank ] || stale_before 2 $manifests/.done $manifests/.fbank.done "the manifests were made again after the fbank"
[ "$input_type" != fbank ] || unfinished 2 $manifests/.fbank.done "the fbank"
stale_before 3 $manifests/.done $lang/.done "the manifests were made again after the tokenizer"
unfinished 3 $lang/.done "the tokenizer"

if run_stage 1; then
  splits=$(for d in "$corpus_dir"/*/; do [ ! -f "$d/wav.scp" ] || printf '%s ' "$(basename "$d")"; done)
  # what the manifests are made of, beside data/: the splits, and those kept whole (no duration
  # limits: scored, validated on, or a benchmark's fixed subset); a marker without them is older: taken
  manifest_inputs=$(printf 'splits %s\neval_splits %s\n' "$(echo $splits)" \
    "$(printf '%s\n' $test_sets $valid_set $whole_splits | sort -u | tr '\n' ' ' | sed 's/ $//')")  # as a set
  if done_or_force $manifests/.done && [ ! data/.data.done -nt $manifests/.done ] \
      && { [ ! -s $manifests/.done ] || [ "$manifest_inputs" = "$(cat $manifests/.done)" ]; }; then
    log "manifests ready"
  else
    if [ -f $manifests/.done ] && [ ! data/.data.done -nt $manifests/.done ]; then
      log "the manifests were made for other splits: $(changed_inputs $manifests/.done "$manifest_inputs"): making them again"
    elif [ -f $manifests/.done ]; then
      log "data/ was prepared again after the manifests: making them again"
    fi
    log "manifests from $corpus_dir"
    supersede_commands $manifests
    rm -f $manifests/.done  # the manifests are rewritten in place: a kill must leave no marker
    "$python" -m sslasr.bin.prepare_manifests --corpus-dir "$corpus_dir" --corpus "$corpus" \
      --splits $splits --eval-splits $test_sets $valid_set $whole_splits --out-dir $manifests --num-jobs "$nj"
    for split in $(recorded_splits); do  # a split of an earlier corpus (e.g. its unlabeled/) would
      case " $splits " in *" $split "*) continue ;; esac  # go on into pretraining and the noisy-student pool
      log "removing the manifests of split $split: $corpus_dir has no $split/ now"
      rm -f $manifests/${corpus}_{recordings,supervisions,cuts}_$split.jsonl.gz $manifests/${corpus}_cuts_${split}_fbank.jsonl.gz \
        $manifests/${corpus}_${split}_validation.json $manifests/${corpus}_${split}_dropped.tsv
    done
    printf '%s\n' "$manifest_inputs" > $manifests/.done.tmp && mv -f $manifests/.done.tmp $manifests/.done
    note_command $manifests "manifests made"
  fi
fi

fbank_outputs() {  # fbank_outputs: stage 2's manifests, an fbank copy of each of stage 1's splits.
  # Not of what stages 4-5 made of them for waveform frontends (the pretraining manifest, a labeled
  # subset, its speed-perturbed copies): fbank frontends make theirs from these copies
  local split
  for split in $(recorded_splits); do
    [ -e "$manifests/${corpus}_cuts_$split.jsonl.gz" ] || continue
    printf '%s\n' "$manifests/${corpus}_cuts_${split}_fbank.jsonl.gz"
  done
}
other_extractors_fbank() {  # other_extractors_fbank: stage 2's manifests whose features another extractor computed
  "$python" - $(fbank_outputs) <<'EOF'
import os, sys
from sslasr.bin.compute_fbank import SeamlessFbank
from sslasr.data.loader import feature_type
for path in filter(os.path.exists, sys.argv[1:]):
    found = feature_type(path)
    if found not in (None, SeamlessFbank.name):
        print(f"{path} ({found})")
EOF
}
if run_stage 2; then
  if [ "$input_type" != fbank ]; then log "$frontend reads raw waveforms: no features to compute"
  elif done_or_force $manifests/.fbank.done && [ ! $manifests/.done -nt $manifests/.fbank.done ]; then
    # e.g. Kaldi's default fbank, computed before stage 2 computed w2v-BERT 2.0's: kept, models
    # would mix the two (an imported w2v-BERT 2.0 would read features it never saw)
    other=$(other_extractors_fbank)
    if [ -n "$other" ]; then
      log "fbank computed by another extractor than this version's: $(printf '%s' "$other" | tr '\n' ' ')"
      log "compute it again: --stage 2 --stop-stage 2 --force true (systems trained on the old features then need --force true" \
        "or --tag; a checkpoint imported with --init-from before, --stage 4 --stop-stage 4 --force true to import it again)"
      exit 2
    fi
    log "fbank ready"
  else
    [ ! -f $manifests/.fbank.done ] || log "the manifests were made again after the fbank: computing it again"
    # the archives are rewritten in place: until all are, neither the marker nor what stages 4-5
    # made of the earlier fbank (the pretraining manifest, a labeled subset, its speed-perturbed
    # copies, pointing into them) may stand, so that a computation killed part-way is not taken
    # as done (those stages make theirs again)
    rm -f $manifests/.fbank.done
    supersede_commands data/fbank
    outputs=$(fbank_outputs)
    for f in $manifests/${corpus}_cuts_*_fbank*.jsonl.gz; do
      [ -e "$f" ] || continue
      case $'\n'"$outputs"$'\n' in *$'\n'"$f"$'\n'*) continue ;; esac
      log "removing $f: made from the earlier fbank (stages 4-5 make it again)"
      rm -f "$f"
    done
    for f in $outputs; do
      "$python" -m sslasr.bin.compute_fbank --cuts "${f%_fbank.jsonl.gz}.jsonl.gz" --out-cuts "$f" \
        --storage data/fbank --num-jobs "$nj"
    done
    note_command data/fbank "fbank computed"  # (in its own dir: waveform systems' rows do not name it)
    touch $manifests/.fbank.done
  fi
fi

if run_stage 3; then
  if done_or_force $lang/.done && [ ! $manifests/.done -nt $lang/.done ]; then log "tokenizer ready ($lang)"; else
    [ ! -f $lang/.done ] || log "the manifests were made again after the tokenizer: training it again"
    supersede_commands $lang
    "$python" -m sslasr.bin.train_tokenizer --cuts "$(cuts train)" --out-dir $lang --vocab-size "$vocab_size" \
      --model-type "$token_type"
    note_command $lang "tokenizer trained"
    touch $lang/.done
  fi
fi

content_hash() {  # content_hash FILE...: of the files' contents together (.gz ones uncompressed: gzip stamps the time)
  local f
  for f in "$@"; do [ -f "$f" ] || { echo "missing:$f"; return 0; }; done
  for f in "$@"; do case $f in *.gz) gzip -dc "$f" ;; *) cat "$f" ;; esac; done | sha256sum | cut -c1-16
}
# Configs are recorded by what they set, merged in order: a setting changed in a _base_ file is
# another training, an edited comment or layout is not.
settings_digest() {  # settings_digest CONFIG...: 16 hex digits
  "$python" - "$@" <<'EOF'
import sys
from sslasr.utils.config import settings_digest
print(settings_digest(sys.argv[1:]))
EOF
}
configs_line() {  # configs_line CONFIG...: the inputs.txt line of the configs (a config that fails to load stops here)
  local digest f
  for f in "$@"; do [ -f "$f" ] || { echo "configs $* missing:$f"; return 0; }; done  # as content_hash
  digest=$(settings_digest "$@") || { echo "$0: the configs $* do not load (above)" >&2; return 1; }
  echo "configs $* $digest"
}
bytes_hashed() {  # bytes_hashed INPUTS: INPUTS as recorded before the configs were hashed by their settings
  local line words  # (by their bytes, _base_ files left out): such a record is taken, and recorded again
  while IFS= read -r line; do
    case $line in
      "configs "*) read -ra words <<< "${line#configs }"; unset 'words[-1]'
                   echo "configs ${words[*]} $(content_hash "${words[@]}")" ;;
      "config "*) echo "config $(content_hash $conf_dir/lm.yaml)" ;;
      *) printf '%s\n' "$line" ;;
    esac
  done <<< "$1"
}
# A training dir records what it is made from (inputs.txt) when its training starts. Its model or
# checkpoint made from other inputs (options, configs, tokenizer, cuts, pretrained model) is refused,
# as stage 0 refuses data/: --force true trains it again, --tag / --pretrain-tag a variant beside it.
made_from() {  # made_from DIR INPUTS: refuse DIR's model or checkpoint if made from other INPUTS, else record INPUTS
  local dir=$1 inputs=$2 old shown
  if [ "$force" != true ] && { [ -e $dir/.done ] || [ -e $dir/checkpoint_last.pt ] || [ -e $dir/model_final.pt ] \
      || [ -e $dir/iter1 ]; }; then  # trained (iter1: a k-means pretraining's first iteration), or resumable
    if [ ! -f $dir/inputs.txt ]; then log "$dir: made before its inputs were recorded: not checked"; return 0; fi
    [ "$inputs" != "$(cat $dir/inputs.txt)" ] || return 0
    old=$(bytes_hashed "$inputs")
    if [ "$old" = "$(cat $dir/inputs.txt)" ]; then
      log "$dir: its configs were recorded by their bytes: taken, recorded by their settings now"
    else
      # a record of before, with the configs by their bytes, is shown against its own kind of lines
      shown=$inputs
      [ "$(grep '^configs ' $dir/inputs.txt)" != "$(printf '%s\n' "$old" | grep '^configs ')" ] || shown=$old
      log "$dir was made from other inputs: $(changed_inputs $dir/inputs.txt "$shown")"
      log "pass --force true to train it again from these, or --tag (--pretrain-tag: pretraining) for a variant beside it"
      exit 2
    fi
  fi
  # under --force the old model, checkpoint and markers go before the new inputs are recorded:
  # killed in between, a rerun would take them as made from these inputs (k-means markers included)
  if [ "$force" = true ] && [ "$node_rank" = 0 ]; then reset_training $dir $dir/iter*; rm -f $dir/iter*/.*done; fi
  record_inputs $dir "$inputs"
}
record_inputs() {  # record_inputs DIR INPUTS: DIR/inputs.txt, atomically (other nodes read it meanwhile), on node 0
  [ "$node_rank" = 0 ] || return 0  # shared files are node 0's to write
  mkdir -p $1 && printf '%s\n' "$2" > $1/inputs.txt.tmp && mv -f $1/inputs.txt.tmp $1/inputs.txt
}
pretraining_inputs() {  # what $pretrain_dir is made from: --init-from's source, or configs, options and audio
  local split
  if [ -n "$init_from" ]; then echo "init_from $init_from $(init_from_digest)"; return; fi  # the dir is named by its basename only
  configs_line $pretrain_configs || return 1
  echo "pretrain_opts $pretrain_opts"
  echo "kmeans_opts $kmeans_opts"
  for split in $pretraining_splits; do echo "cuts $(cuts $split) $(content_hash "$(cuts $split)")"; done
}
present_splits() {  # present_splits SPLIT...: those stage 1 made manifests of, the others named (e.g. the
  local split       # OpenSLR release of speechocean762 has no unlabeled/)
  for split in "$@"; do
    if [ -f "$(cuts $split)" ]; then printf '%s ' $split; else log "no $split split ($(cuts $split)): left out"; fi
  done
}
finetuning_inputs() {  # finetuning_inputs pretrained|scratch TRAIN_CUTS CONFIG...: what a fine-tuned system is made from
  local system=$1 train=$2; shift 2
  configs_line "$@" || return 1
  echo "finetune_opts $finetune_opts"
  echo "tokenizer $lang $(content_hash $lang/bpe.model)"
  echo "train_cuts $train $(content_hash "$train")"
  [ $system = scratch ] || echo "pretrained $pretrain_dir/model_final.pt $(content_hash $pretrain_dir/model_final.pt)"
}

init_from_digest() {  # of the files the import reads: weights downloaded again into the same folder are another model
  local files
  files=$(cd "$init_from" && ls config.json preprocessor_config.json processor_config.json model*.safetensors* \
    pytorch_model*.bin* 2>/dev/null || :)
  (cd "$init_from" && content_hash $files)
}
import_init_from() {  # --init-from converted to our pretraining format, where stage 4 would write
  local inputs
  inputs=$(pretraining_inputs)
  if [ "$(cat $pretrain_dir/inputs.txt 2>/dev/null)" = "init_from $init_from" ]; then
    log "$pretrain_dir: recorded by --init-from's path alone, before its files were hashed: taken, recorded with them now"
    record_inputs $pretrain_dir "$inputs"
  else
    made_from $pretrain_dir "$inputs"  # another source of the same basename, or other files at its path, is refused
  fi
  if done_or_force $pretrain_dir/.done; then log "imported $frontend ready ($pretrain_dir)"; return; fi
  log "importing $init_from into $pretrain_dir (instead of pretraining)"
  supersede_commands $pretrain_dir
  "$python" -m sslasr.cli import-hf "$init_from" --out $pretrain_dir/model_final.pt
  note_command $pretrain_dir imported
  touch $pretrain_dir/.done
}
if run_stage 4 && [ -n "$init_from" ]; then import_init_from; fi

# pretraining configs; pretrain_<frontend>.yaml, where present, holds that frontend's own batch/schedule
pretrain_configs="$frontend_conf $conf_dir/pretrain.yaml"
[ ! -f $conf_dir/pretrain_$frontend.yaml ] || pretrain_configs="$pretrain_configs $conf_dir/pretrain_$frontend.yaml"
[ -z "$model_size" ] || [ ! -f $conf_dir/pretrain_$frontend_tag.yaml ] \
  || pretrain_configs="$pretrain_configs $conf_dir/pretrain_$frontend_tag.yaml"  # ... and its --model-size's
kmeans_cli() {  # kmeans_cli COMMAND ARGS...: sslasr.bin.kmeans with the pretraining configs and --kmeans-opts
  local command=$1; shift
  "$python" -m sslasr.bin.kmeans "$command" --config $pretrain_configs \
    "$@" --set $kmeans_opts
}
# A multi-node --launcher (torchrun --node_rank N) runs this driver on every node; the work of
# stage 4 that is not training (k-means fits and labels, the final copy) is node 0's alone, the
# others wait for its markers on the shared exp dir instead of writing the same files at once.
# If that work fails on node 0, it leaves .node0_failed there, and the others stop too (after
# --node-wait-hours at the latest) rather than wait for a marker that will never come. A pretraining
# manifest left by an earlier run counts only if no split manifest is newer; k-means markers cannot
# tell an earlier run's from this one's, so under --force node 0 (which removes them) starts first.
started_at=$(date +%s)
node0_failed=$pretrain_dir/.node0_failed  # node 0's failure, for the others to see (stage 9 has its own)
on_node_0() {  # on_node_0 COMMAND...: node 0's share of stage 4; a failure is left for the other nodes to see
  "$@" || { local rc=$?; touch "$node0_failed"; return $rc; }
}
train_together() {  # train_together EXP_DIR ...: a training of every node; node 0's failure is left for the others
  if [ "$node_rank" = 0 ]; then on_node_0 train "$@"; else train "$@"; fi
}
mark_trained() {  # mark_trained MARKER: node 0's to touch. Another node's torchrun returns 0 even when node 0,
  [ "$node_rank" != 0 ] || touch "$1"  # which alone writes model_final.pt, failed after the last barrier
}
node_0_silent() {  # true when node 0 beat after this node started, then stopped --node-silence-seconds ago
  [ -n "$node_started" ] && [ -f "$node0_alive" ] || return 1
  touch "$node_probe"
  local beat now
  beat=$(stat -c %Y "$node0_alive"); now=$(stat -c %Y "$node_probe")
  [ "$beat" -ge "$node_started" ] && [ $((now - beat)) -gt "$node_silence_seconds" ]
}
newer_input() {  # newer_input FILE INPUT...: true when an INPUT is newer than FILE (made from an older one)
  local file=$1 input; shift  # or missing (not made yet, or gone): FILE was not made from it
  for input in "$@"; do [ -e "$input" ] && [ ! "$input" -nt "$file" ] || return 0; done
  return 1
}
wait_for_node_0() {  # wait_for_node_0 MARKER WHAT [INPUT...]: until MARKER exists and is newer than each INPUT
  # (and, where the caller sets ready_also, that command holds: eval'd at each look)
  local marker=$1 what=$2 waited=0 failed=$node0_failed stale=""; shift 2
  [ $# -eq 0 ] && [ -z "${ready_also:-}" ] || stale=", or older than its inputs"
  until [ -f "$marker" ] && ! newer_input "$marker" "$@" && { [ -z "${ready_also:-}" ] || eval "$ready_also"; }; do
    # a marker left by an earlier run (before this node started) is not this run's failure; with
    # $started_stamp or $node_started (files this node touched on the shared filesystem), both
    # times are its server's, not this machine's clock against the server's
    if [ -f "$failed" ] && if [ -n "$started_stamp" ]; then [ ! "$started_stamp" -nt "$failed" ]
                           else [ "$(stat -c %Y "$failed")" -ge "${node_started:-$started_at}" ]; fi; then
      log "node $node_rank: node 0 failed in its $what ($failed; see node 0's log)"; exit 1
    fi
    if node_0_silent; then
      log "node $node_rank: node 0's driver has not run for over $node_silence_seconds s ($node0_alive): it ended, " \
          "was killed or its machine is down, before its $what ($marker)"; exit 1
    fi
    if [ $waited -ge $((node_wait_hours * 3600)) ]; then
      log "node $node_rank: node 0's $what ($marker) not there$stale, after $node_wait_hours h (--node-wait-hours)"
      exit 1
    fi
    [ $((waited % 600)) -ne 0 ] || log "node $node_rank: waiting for node 0's $what ($marker)"
    sleep 10
    waited=$((waited + 10))
  done
}
kmeans_model_digest() {  # kmeans_model_digest KMEANS: the SHA-256 of the model its features came from ("" if none recorded)
  "$python" - "$1" <<'EOF'
import sys, torch
print(torch.load(sys.argv[1], map_location="cpu", weights_only=False)["features"].get("model_sha256") or "")
EOF
}
undo_stale_iteration() {  # undo_stale_iteration I: node 0 undoes what iteration I made from inputs made again.
  # Each marker stays newer than what it was made from, so the other nodes tell the same from times.
  local i=$1 it=$pretrain_dir/iter$1 model recorded="" marker markers=()
  if [ -f $it/.labels.done ] && [ $it/.kmeans.done -nt $it/.labels.done ]; then  # fitted again since
    log "iteration $i: its labels are older than its k-means: labelling and pretraining again"
    rm -f $it/.labels.done
    reset_training $it
  fi
  model=$pretrain_dir/iter$((i - 1))/model_final.pt
  if [ "$i" -gt 1 ] && [ -f $it/.kmeans.done ] && [ "$model" -nt $it/.kmeans.done ]; then
    [ ! -f $it/kmeans.pt ] || recorded=$(kmeans_model_digest $it/kmeans.pt) || { touch "$node0_failed"; return 1; }
    if [ -n "$recorded" ] && [ "$recorded" = "$(sha256sum < "$model" | cut -d' ' -f1)" ]; then
      # written again with the same weights (a finished training rerun): still what this iteration read
      # (one time for all: another node never sees one newer than the next)
      for marker in .labels.done .done; do [ ! -f $it/$marker ] || markers+=($it/$marker); done
      touch $it/.kmeans.done
      [ ${#markers[@]} -eq 0 ] || touch -r $it/.kmeans.done "${markers[@]}"
    else  # an earlier iteration trained again (its .done removed by hand, say): new features, new centres
      log "iteration $i: iteration $((i - 1))'s model changed after this k-means: fitting, labelling and pretraining again"
      rm -f $it/.kmeans.done
    fi
  fi
  if [ ! -f $it/.kmeans.done ]; then  # a k-means to fit: any labels and model here are an older one's
    rm -f $it/.labels.done
    reset_training $it
  fi
}
kmeans_pretraining() {  # kmeans_pretraining CUTS: per k-means iteration (HuBERT), features + fit → labels → pretrain
  local all_cuts=$1 valid_cuts iterations i it previous plan valid_labels
  valid_cuts=$(cuts $valid_set)
  iterations=$(kmeans_cli plan --count)
  for i in $(seq 1 "$iterations"); do
    it=$pretrain_dir/iter$i
    previous=""; [ "$i" -eq 1 ] || previous="--model $pretrain_dir/iter$((i - 1))/model_final.pt"
    valid_labels=$it/labels/$(basename "$valid_cuts")
    [ "$node_rank" != 0 ] || undo_stale_iteration $i
    if [ "$node_rank" != 0 ]; then  # node 0's markers, each newer than what it was made from (and, under
      # --force, than node 0's start: it removes the earlier run's, maybe after this node looked)
      node0_run_start
      wait_for_node_0 $it/.kmeans.done "iteration $i k-means" $forced_since \
        ${previous:+$pretrain_dir/iter$((i - 1))/model_final.pt}
    elif [ -f $it/.kmeans.done ]; then log "iteration $i: k-means ready"; else
      log "iteration $i: k-means on $(basename "$all_cuts")"
      on_node_0 kmeans_cli fit --iteration $i --cuts "$all_cuts" $previous --out $it/kmeans.pt --num-jobs "$nj"
      touch $it/.kmeans.done
    fi
    if [ "$node_rank" != 0 ]; then
      wait_for_node_0 $it/.labels.done "iteration $i labels" $it/.kmeans.done "$valid_labels"
    elif [ -f $it/.labels.done ] && ! newer_input $it/.labels.done $it/.kmeans.done "$valid_labels"; then
      log "iteration $i: labels ready"
    else
      # (labelled already but for another --valid-set: the manifests labelled before are skipped by digest)
      log "iteration $i: labelling every frame of $(basename "$all_cuts") and $(basename "$valid_cuts")"
      on_node_0 kmeans_cli label --kmeans $it/kmeans.pt --cuts "$all_cuts" "$valid_cuts" --out-dir $it/labels --num-jobs "$nj"
      # a model left here was trained on these labels (stale ones were reset above): still done (one
      # time for both: another node never sees labels newer than the model)
      if [ -f $it/.done ]; then touch $it/.done && touch -r $it/.done $it/.labels.done; else touch $it/.labels.done; fi
    fi
    if [ -f $it/.done ] && [ ! $it/.labels.done -nt $it/.done ]; then log "iteration $i: pretrained"; else
      log "iteration $i: pretraining on its labels"
      plan=$(kmeans_cli plan --iteration $i $previous)  # the iteration's settings; a failure stops here
      train_together $it --config $pretrain_configs --set task=pretrain \
        data.train_cuts=$it/labels/$(basename "$all_cuts") data.valid_cuts=$it/labels/$(basename "$valid_cuts") \
        $plan $pretrain_opts
      mark_trained $it/.done
      # node 0 alone writes the model, after the last barrier: the next iteration's check reads it
      [ "$node_rank" = 0 ] || wait_for_node_0 $it/.done "iteration $i model" $it/.labels.done
    fi
  done
  # stage 5 fine-tunes $pretrain_dir/model_final.pt: the last iteration's model, copied atomically
  if [ "$node_rank" = 0 ]; then
    cp $pretrain_dir/iter$iterations/model_final.pt $pretrain_dir/.model_final.pt.tmp
    mv -f $pretrain_dir/.model_final.pt.tmp $pretrain_dir/model_final.pt
  else
    wait_for_node_0 $pretrain_dir/.done "copy of the last iteration's model"
  fi
}

if run_stage 4 && [ "$no_pretrain" != true ] && [ -z "$init_from" ]; then
  pretraining_splits=$(present_splits $pretrain_splits)
  [ -n "$pretraining_splits" ] || { echo "$0: none of the pretraining splits ($pretrain_splits) has a manifest: run stage 1" >&2; exit 1; }
  inputs=$(pretraining_inputs)
  made_from $pretrain_dir "$inputs"
  if done_or_force $pretrain_dir/.done; then log "pretrained $frontend ready ($pretrain_dir)"; else
    log "self-supervised pretraining of $frontend"
    pretrain_cuts=$manifests/${corpus}_cuts_pretrain$feats.jsonl.gz
    pretrain_inputs=$(for s in $pretraining_splits; do cuts "$s"; done)
    if [ "$node_rank" = 0 ]; then  # on a multi-node run, the shared files are node 0's to reset and write
      rm -f $node0_failed  # (under --force, made_from reset the training and each k-means iteration's markers)
      on_node_0 "$python" -m sslasr.bin.cuts combine --out "$pretrain_cuts" $pretrain_inputs
    else  # one left by an earlier run counts only if no split was made again since (nor --force given)
      node0_run_start
      wait_for_node_0 "$pretrain_cuts" "pretraining manifest" $pretrain_inputs $forced_since
    fi
    kmeans_iterations=$(kmeans_cli plan --count)  # a failure stops here
    if [ "$kmeans_iterations" -gt 0 ]; then kmeans_pretraining "$pretrain_cuts"; else
      train_together $pretrain_dir --config $pretrain_configs \
        --set task=pretrain data.train_cuts="$pretrain_cuts" data.valid_cuts="$(cuts $valid_set)" $pretrain_opts
      # node 0 alone writes the model, after the last barrier: stage 5 reads it
      [ "$node_rank" = 0 ] || wait_for_node_0 $pretrain_dir/.done "pretrained model" $forced_since
    fi
    note_command $pretrain_dir pretrained
    mark_trained $pretrain_dir/.done
  fi
fi

finetune_configs() {  # finetune_configs pretrained|scratch: the YAML files of a fine-tuning run, merged in order
  local configs="$frontend_conf $conf_dir/finetune_$head.yaml"
  [ -z "$init_from" ] || configs="$pretrain_dir/frontend.yaml $conf_dir/finetune_$head.yaml"  # imported architecture
  # settings for this amount of labels (e.g. LibriSpeech's 10m / 1h / 10h fairseq configs)
  [ ! -f $conf_dir/finetune_${head}_${labeled_tag}.yaml ] || configs="$configs $conf_dir/finetune_${head}_${labeled_tag}.yaml"
  # fine-tuning settings of the frontend (e.g. SpecAugment for fbank frontends)
  [ ! -f $conf_dir/finetune_${frontend}.yaml ] || configs="$configs $conf_dir/finetune_${frontend}.yaml"
  # ... for this amount of labels (e.g. LibriSpeech's HuBERT base_10h fairseq config)
  [ ! -f $conf_dir/finetune_${head}_${frontend}_${labeled_tag}.yaml ] \
    || configs="$configs $conf_dir/finetune_${head}_${frontend}_${labeled_tag}.yaml"
  # ... and of its --model-size (e.g. a lower learning rate for a wider model)
  [ -z "$model_size" ] || [ ! -f $conf_dir/finetune_${frontend_tag}.yaml ] \
    || configs="$configs $conf_dir/finetune_${frontend_tag}.yaml"
  # its top blocks kept (relative: the list is split on spaces, which the checkout's path may hold)
  [ -z "$init_from" ] || configs="$configs $(realpath -m --relative-to=. "$root/conf/finetune/imported.yaml")"
  [ "$1" != scratch ] || configs="$configs $conf_dir/scratch.yaml"
  echo "$configs"
}
train_cuts=$(cuts train)  # the labeled data: all of train, or --labeled seconds of it
[ "$labeled_seconds" = all ] || train_cuts=$manifests/${corpus}_cuts_train_${labeled_tag}$feats.jsonl.gz
labeled_cuts=$train_cuts  # without speed-perturbed copies: what the labeled amount counts
[ -z "$speed_perturb" ] || train_cuts=${labeled_cuts%.jsonl.gz}$sp_tag.jsonl.gz

finetune_system() {  # finetune_system pretrained|scratch [KEY=VALUE...]: stage 5 for one system
  local system=$1 dir init="finetune.init_from=$pretrain_dir/model_final.pt"
  shift
  dir=$(system_dir $system)
  mkdir -p $dir
  [ $system != scratch ] || init="finetune.init_from=null"
  train $dir --config $(finetune_configs $system) --set task=asr data.train_cuts="$train_cuts" \
    data.valid_cuts="$(cuts $valid_set)" data.tokenizer=$lang/bpe.model "$init" "$@" $finetune_opts
  [ "$node_rank" != 0 ] || "$python" -m sslasr.bin.cuts seconds "$labeled_cuts" > $dir/labeled_seconds
  note_command $dir fine-tuned
  mark_trained $dir/.done
}
finetune_together() {  # finetune_together SYSTEM...: one job each, the cores shared out, logs to files
  # (the nproc command, not the option: the CPUs this process may use, its affinity counted; it
  # would also answer OMP_NUM_THREADS, which trainer.num_threads overrides)
  local system pids=() threads=$(( $(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) / $# )) failed=""
  [ "$threads" -ge 1 ] || threads=1
  # A script's background jobs ignore SIGINT and outlive it: on Ctrl-C or a kill of the driver, end
  # each job's process group (set -m: one per job), the trainer and its loader workers included
  trap 'kill -TERM -- "${pids[@]/#/-}" 2>/dev/null; exit 130' INT
  trap 'kill -TERM -- "${pids[@]/#/-}" 2>/dev/null; exit 143' TERM
  trap 'kill -TERM -- "${pids[@]/#/-}" 2>/dev/null; exit 129' HUP  # a closed terminal (ssh dropped)
  for system in "$@"; do
    mkdir -p $(system_dir $system)
    log "fine-tuning $(system_dir $system) ($threads threads; log: $(system_dir $system)/finetune.log)"
    set -m
    finetune_system $system trainer.num_threads=$threads >> $(system_dir $system)/finetune.log 2>&1 &
    set +m
    pids+=($!)
  done
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || failed="$failed $(system_dir ${@:$((i + 1)):1})"
  done
  for dir in $failed; do tail -n 20 $dir/finetune.log >&2; done
  trap - INT TERM HUP
  [ -z "$failed" ] || { echo "$0: fine-tuning failed:$failed" >&2; exit 1; }
}

audio_subset=${labeled_cuts%$feats.jsonl.gz}.jsonl.gz audio_train=$manifests/${corpus}_cuts_train.jsonl.gz
labeled_manifests() {  # stage 5's manifests: the --labeled subset, its speed-perturbed copy (node 0's)
  if [ "$labeled_seconds" = all ]; then :
  elif [ -f "$corpus_dir/train_$labeled_tag/wav.scp" ]; then
    # the corpus's own split (Libri-Light's train_10m / 1h / 10h): stage 1's manifest, never a draw
    [ -f "$labeled_cuts" ] || { echo "$0: --labeled $labeled: the corpus's split train_$labeled_tag has no manifest ($labeled_cuts): run stages 1-2" >&2; exit 1; }
    log "--labeled $labeled: the corpus's split train_$labeled_tag"
  else
    # a seeded subset of train, drawn again from a train manifest remade since (stage 1 under
    # --force: other speakers may be held out now) and under --force. Always from the audio
    # manifest, as a waveform frontend draws it; an fbank frontend takes those cuts' fbank copies:
    # the LM's text is that subset's transcripts (lm_inputs) whichever frontend drew first (drawn
    # from the fbank copy, the LM recorded another path, and --frontend all trained the LM and the
    # noisy students again), and the cuts are the same though stage 2 may have lost some
    if [ "$force" = true ] || [ ! -f "$audio_subset" ] || [ "$audio_train" -nt "$audio_subset" ]; then
      "$python" -m sslasr.bin.cuts subset --cuts "$audio_train" --seconds "$labeled_seconds" --out "$audio_subset"
    fi
    if [ -n "$feats" ] && { [ "$force" = true ] || [ ! -f "$labeled_cuts" ] || [ "$(cuts train)" -nt "$labeled_cuts" ] \
        || [ "$audio_subset" -nt "$labeled_cuts" ]; }; then
      "$python" -m sslasr.bin.cuts select --cuts "$(cuts train)" --ids-of "$audio_subset" --out "$labeled_cuts"
    fi
  fi
  if [ -n "$speed_perturb" ] && { [ "$force" = true ] || [ ! -f "$train_cuts" ] || [ "$labeled_cuts" -nt "$train_cuts" ]; }; then
    log "speed perturbation $speed_perturb of $labeled_cuts"  # fbank frontends: the copies' features too
    rm -f "$train_cuts"  # its fbank archives are rewritten in place: killed, no manifest may point into them
    "$python" -m sslasr.bin.cuts perturb-speed --cuts "$labeled_cuts" --factors $speed_perturb \
      ${feats:+--fbank-storage data/fbank} --num-jobs "$nj" --out "$train_cuts"
  fi
}
if run_stage 5; then
  [ -z "$init_from" ] || [ "$stage" -le 4 ] || import_init_from  # stage 4's import, which did not run
  case " $systems " in *" pretrained "*)  # (--force removes the model first; HuBERT copies it at the end)
    [ -n "$init_from" ] || [ -f $pretrain_dir/.done ] || {
      echo "$0: stage 4 has not finished the pretraining (no $pretrain_dir/.done: killed part-way, or never run):" \
        "include stage 4 (--stage 4)" >&2; exit 2; } ;;
  esac
  if [ "$node_rank" = 0 ]; then
    labeled_manifests
  else  # on a shared filesystem every node would rewrite the same files (fbank archives in place)
    made_of=()  # what node 0 makes them of: they must be newer (and, under --force, than its start)
    if [ "$labeled_seconds" != all ] && [ ! -f "$corpus_dir/train_$labeled_tag/wav.scp" ]; then  # a drawn subset
      made_of+=("$(cuts train)" "$audio_train" "$audio_subset")
    fi
    [ -z "$speed_perturb" ] || made_of+=("$labeled_cuts")
    if [ ${#made_of[@]} -gt 0 ]; then  # (a corpus's own manifest, taken as it is: not made again under --force)
      node0_run_start
      made_of+=($forced_since)
    fi
    wait_for_node_0 "$train_cuts" "labeled manifests" ${made_of[@]+"${made_of[@]}"}
  fi
  pending=()
  for system in $systems; do
    inputs=$(finetuning_inputs $system "$train_cuts" $(finetune_configs $system))
    made_from $(system_dir $system) "$inputs"
    if done_or_force $(system_dir $system)/.done; then log "$(system_dir $system) ready"; else
      fresh_training $(system_dir $system)
      pending+=($system)
    fi
  done
  if [ "$finetune_jobs" -gt 1 ] && [ ${#pending[@]} -gt 1 ] && [ "$nproc" -eq 1 ] && [ -z "$launcher" ]; then
    finetune_together "${pending[@]}"
  else
    for system in "${pending[@]}"; do log "fine-tuning $(system_dir $system)"; finetune_system $system; done
  fi
fi

lm_dir=$exp/lm_${token_type}_${vocab_size}
lm_inputs() {  # lm_inputs CUTS: what an LM is trained from (text, tokenizer, --lm-text contents, --lm-opts, config)
  local f digest text=${1%$feats.jsonl.gz}.jsonl.gz  # a fbank manifest's transcripts are its audio one's: one LM for both
  [ -e "$text" ] || text=$1  # (an fbank-only run's labeled subset has no audio manifest: its own)
  # by content: a remade manifest or tokenizer (its token ids) makes another LM under the same path
  echo "text $text $(content_hash "$text")"
  echo "tokenizer $lang $(content_hash $lang/bpe.model)"
  for f in $lm_text; do echo "lm_text $f $(sha256sum < "$f" | cut -c1-16)"; done
  echo "lm_opts $lm_opts"
  digest=$(configs_line $conf_dir/lm.yaml) || return 1
  echo "config ${digest##* }"
}
lm_record_matches() {  # lm_record_matches DIR INPUTS: DIR's LM was trained on INPUTS (lm_inputs' lines)
  local now=$2 recorded old
  recorded=$(cat $1/inputs.txt)
  [ "$now" != "$recorded" ] || return 0
  old=$(bytes_hashed "$now")
  if [ "$old" = "$recorded" ]; then
    log "$1: its config was recorded by its bytes: taken, recorded by its settings now"
  else  # a record from before the text's and tokenizer's contents were (and the config's settings)
    ! grep -q '^tokenizer ' $1/inputs.txt || return 1
    [ "$(printf '%s\n' "$old" | sed -e '/^tokenizer /d' -e 's/^\(text [^ ]*\) .*/\1/')" = "$recorded" ] || return 1
    log "$1: inputs recorded before their contents were: taken, recorded with them now"
  fi
  record_inputs $1 "$now"
}
train_lm() {  # train_lm DIR CUTS: the token LM (conf/lm.yaml) on CUTS' transcripts + --lm-text, and its lexicon
  local dir=$1 text=$2 extra_text=null force=$force inputs  # (force: for done_or_force and the rest of this call)
  inputs=$(lm_inputs "$text")  # read once: what is recorded is what the training read
  if [ -n "${SSLASR_SHARED_MADE:-}" ] && [ "$force" = true ]; then  # --frontend all: the first frontend's run made it
    log "$dir: trained by the first frontend's run of --frontend all: not again (--force)"
    force=false
  fi
  # trained, or killed while training (its checkpoint would be resumed), on other inputs: e.g.
  # `--stage 6 --lm-text more.txt` after a full run: trained again, and stages 7-8 redo what used it
  if { [ -f $dir/.done ] || [ -f $dir/checkpoint_last.pt ]; } && [ -f $dir/inputs.txt ] && [ "$force" != true ] \
      && ! lm_record_matches $dir "$inputs"; then
    log "$dir was trained on other inputs; training it again: $(changed_inputs $dir/inputs.txt "$inputs")"
    reset_training $dir
  fi
  if done_or_force $dir/.done; then log "LM ready ($dir)"; else
    log "training the token LM in $dir on the text of $text"
    fresh_training $dir
    # recorded as the training starts (a killed one resumes on these only); the lexicon is made
    # after the model, of these inputs (one left from other inputs would pass for it)
    record_inputs $dir "$inputs"
    [ "$node_rank" != 0 ] || rm -f $dir/words.txt
    [ -z "$lm_text" ] || extra_text="[$(printf '%s,' $lm_text | sed 's/,$//')]"
    train $dir --config $conf_dir/lm.yaml --set task=lm data.tokenizer=$lang/bpe.model \
      data.train_text="$text" data.valid_text="$(cuts $valid_set)" "data.extra_text=$extra_text" $lm_opts
    [ "$node_rank" = 0 ] || return 0  # the files beside the model are node 0's to write
    "$python" -m sslasr.bin.lm_perplexity --lm $dir/model_final.pt --text "$(cuts $valid_set)" --out $dir/perplexity.json
    note_command $dir "LM trained"
    touch $dir/.done
  fi
  # the lexicon of lexicon-constrained decoding (ctc_lexicon): the words of the LM's text
  if [ "$node_rank" = 0 ] && { [ ! -f $dir/words.txt ] || [ "$force" = true ]; }; then
    "$python" -m sslasr.bin.lexicon --text "$text" $lm_text --out $dir/words.txt
  fi
}
if run_stage 6; then
  if [ ! -f $conf_dir/lm.yaml ]; then log "no $conf_dir/lm.yaml: no LM"; else train_lm $lm_dir "$(cuts train)"; fi
fi
# conf/noisy_student.yaml, then conf/noisy_student_<labeled>.yaml where one exists (as the
# fine-tuning configs): a filter tuned for one amount of labels
noisy_student_configs=$conf_dir/noisy_student.yaml
[ ! -f $conf_dir/noisy_student_${labeled_tag}.yaml ] || noisy_student_configs="$noisy_student_configs $conf_dir/noisy_student_${labeled_tag}.yaml"
noisy_student_setting() {  # noisy_student_setting KEY DEFAULT: pseudo_label.KEY of $noisy_student_configs
  "$python" - "$1" "$2" $noisy_student_configs <<'EOF'
import sys
from sslasr.utils.config import load_configs
value = (load_configs(sys.argv[3:]).get("pseudo_label") or {}).get(sys.argv[1])
print(" ".join(map(str, value)) if isinstance(value, list) else sys.argv[2] if value is None else value)
EOF
}
pool_manifests() {  # the manifests unlabeled_pool reads: the pool is made of their contents
  local source
  for source in $pool_sources; do
    case $source in
      unlabeled) [ ! -f "$(cuts unlabeled)" ] || cuts unlabeled ;;
      rest_of_train) [ "$labeled_seconds" = all ] || cuts train ;;
    esac
  done
}
if run_stage 9 && [ "$generations" -gt 0 ]; then
  # before stage 7: on a multi-node run every node is here at once (node 0 alone decodes in 7-8)
  [ -f $conf_dir/noisy_student.yaml ] || { echo "$0: --generations needs $conf_dir/noisy_student.yaml" >&2; exit 1; }
  [ "$no_pretrain" != true ] || { echo "$0: noisy student starts from the pretrained system" >&2; exit 2; }
  # The LM (and lexicon) of the pseudo-labelling search must not have read the pool's transcripts:
  # with rest_of_train in the pool, one trained on the text of the --labeled cuts (+ --lm-text).
  pseudo_label_lm_dir=$lm_dir
  pool_sources=$(noisy_student_setting pool unlabeled)  # read once, for every generation
  pool_digest=$(content_hash $(pool_manifests))  # (another node compares the record every 10 s)
  case " $pool_sources " in *" rest_of_train "*)
    if [ "$labeled_seconds" != all ] && [ -f $conf_dir/lm.yaml ]; then
      pseudo_label_lm_dir=${lm_dir}_labeled_$labeled_tag
      train_lm $pseudo_label_lm_dir "$labeled_cuts"
    fi
    # Stage 3's tokenizer read all of train. Letters leak nothing; a subword inventory is shaped
    # by the withheld transcripts, so say so (the pseudo-label WER is then slightly optimistic).
    [ "$labeled_seconds" = all ] || [ "$token_type" = char ] || log "WARNING: the $token_type tokenizer" \
      "($lang) was trained on all of train, the rest_of_train transcripts withheld here included" ;;
  esac
fi
# the other nodes wait in stage 9 for node 0's pseudo-labels; a failure of node 0 is marked for them
[ -z "$noisy_student_multinode" ] || node0_failed=$noisy_student_dir/.node0_failed
if [ "$node_rank" != 0 ]; then  # see $node_rank: decoding, scoring and results are node 0's
  if [ -n "$noisy_student_multinode" ]; then
    log "node $node_rank: stages 7, 8 and 10 run on node 0 alone; stage 9's students train here too"
  else
    [ "$stop_stage" -lt 7 ] || log "node $node_rank: stages 7-10 run on node 0 alone: done here"
    exit 0
  fi
fi
# what a decoding method reads of stage 6's output: METHOD+lm the LM, *lexicon* its words.txt
uses_lm() { case " $* " in *"+lm "*) return 0 ;; esac; return 1; }        # uses_lm METHOD...: any of them
uses_lexicon() { case " $* " in *lexicon*) return 0 ;; esac; return 1; }  # uses_lexicon METHOD...: any of them
lexicon_opts() {  # lexicon_opts LM_DIR METHODS...: --lexicon for lexicon-constrained methods
  local dir=$1; shift
  uses_lexicon "$@" || return 0
  [ -f $dir/words.txt ] || { echo "$0: $*: the lexicon methods need stage 6 ($dir/words.txt)" >&2; exit 1; }
  echo "--lexicon $dir/words.txt"
}

decode_methods() {  # decode_methods SYSTEM_DIR: the model config's decoding methods, METHOD+lm with the LM
  "$python" - "$1/config.yaml" <<'EOF'
import sys
from sslasr.utils.config import load_config
cfg = load_config(sys.argv[1])
decode = cfg.get("decode", {})
if "methods" in decode:
    methods = decode["methods"]
else:  # the head's greedy method; importing the heads (torch) costs seconds, so only here
    from sslasr.models.heads import HEADS
    methods = [HEADS[cfg.get("head", {}).get("name", "ctc")].greedy_method]
print(" ".join(methods + [m + "+lm" for m in decode.get("lm_methods", [])]))
EOF
}
json_value() {  # json_value FILE KEY [DEFAULT]: the value (null for none); DEFAULT when the key is missing, else fails
  "$python" -c 'import json, sys
d = json.load(open(sys.argv[1]))
v = d[sys.argv[2]] if len(sys.argv) < 4 or sys.argv[2] in d else sys.argv[3]
print("null" if v is None else v)' "$@"
}

decode_sets=$test_sets  # + the validation set, which the LM methods tune λ, β on
case " $test_sets " in *" $valid_set "*) ;; *) decode_sets="$valid_set $test_sets" ;; esac
decode_system() {  # decode_system DIR: every set with every method of DIR's model, in one process
  local dir=$1 methods fusion="" overwrite="" lexicon request set_files
  methods=$(decode_methods $dir)  # a failure stops here
  set_files=$(for s in $decode_sets; do cuts "$s"; done)
  request=$(printf 'sets %s\nmethods %s\ndecode_opts %s\nset_contents %s' "$decode_sets" "$methods" "$decode_opts" \
    "$(content_hash $set_files)")
  # decoded (.decode.done holds the request), unless the request (another --test-sets,
  # --decode-opts, a set's manifest made again), the model, the LM or its lexicon changed since:
  # decode.py redoes what they change (a record from before set_contents: compared without it,
  # its sets' manifests by time)
  if done_or_force $dir/.decode.done && [ ! $lm_dir/.done -nt $dir/.decode.done ] \
      && [ ! $dir/model_final.pt -nt $dir/.decode.done ] && { [ "$request" = "$(cat $dir/.decode.done)" ] \
      || { [ "$(sed '/^set_contents /d' <<<"$request")" = "$(cat $dir/.decode.done)" ] \
           && ! newer_input $dir/.decode.done $set_files; }; }; then
    log "$dir: decoded"; return
  fi
  if uses_lm $methods; then  # λ, β tuned on the validation set, then used for every set
    [ -f $lm_dir/.done ] || { echo "$0: $methods: the LM methods need stage 6 ($lm_dir)" >&2; exit 1; }
    fusion="--lm $lm_dir/model_final.pt --tune-on $valid_set"
  fi
  lexicon=$(lexicon_opts $lm_dir $methods)  # its error stops here
  # under --force every decode is made again: the earlier decodes' commands no longer made any
  [ "$force" != true ] || { overwrite=--overwrite; supersede_notes $dir decoded; }
  log "decoding $decode_sets with $dir: $methods"
  rm -f $dir/.decode.done  # killed inside, a rerun of the earlier request would take the new decodes for done
  "$python" -m sslasr.bin.decode --model $dir/model_final.pt \
    --cuts $(for s in $decode_sets; do printf '%s=%s ' "$s" "$(cuts "$s")"; done) \
    --methods $methods --out-dir "$dir/decode_{set}_{method}" $fusion $lexicon $overwrite $decode_opts
  note_command $dir decoded
  printf '%s\n' "$request" > $dir/.decode.done
}
score_system() {  # score_system DIR pretrained|scratch GENERATION BASELINE [KEY=VALUE...]: a results row per (set, method)
  # BASELINE: an exp dir whose decode of the same set and method each row is compared with, or ""
  # $upstream (a noisy student's teachers and pseudo-labels): their commands are the rows' too
  local dir=$1 pretrained=false row_frontend=none generation=$3 baseline_dir=$4 method lm_row test_set out baseline missing
  local scored_with
  local made_by command methods lm_weight length_bonus parameters
  [ $2 != pretrained ] || { pretrained=true; row_frontend=$frontend; }
  shift 4
  methods=$(decode_methods $dir)  # a failure stops here
  for method in $methods; do
    lm_row="" made_by="data $manifests $lang"  # the data preparation's commands (e.g. --corpus-dir, --data-opts)
    [ "$input_type" != fbank ] || made_by="$made_by data/fbank"
    [ $pretrained != true ] || made_by="$made_by $pretrain_dir"
    ! uses_lm $method || lm_row="lm_perplexity=$(json_value $lm_dir/perplexity.json perplexity)"
    ! uses_lm $method && ! uses_lexicon $method || made_by="$made_by $lm_dir"  # (the lexicon: the LM's text's words)
    command=$(row_command $made_by ${upstream:-} $dir)
    for test_set in $test_sets; do
      out=$dir/decode_${test_set}_${method/+lm/_lm}
      baseline=${baseline_dir:+$baseline_dir/decode_${test_set}_${method/+lm/_lm}} missing=""
      if [ -n "$baseline" ] && [ ! -f $baseline/hyp.txt ]; then missing=$baseline; baseline=""; fi  # e.g. decoded by other methods
      # rescored when decoded again, or when its baseline was, or is another (e.g. none then, one now):
      # its Δ, confidence interval and teacher WER would describe a decode the tables no longer show
      scored_with=$baseline  # an empty .scored, touched before it named its baseline: the one there then
      [ ! -s $out/.scored ] || scored_with=$(cat $out/.scored)
      if done_or_force $out/.scored && [ ! $out/hyp.txt -nt $out/.scored ] && [ "$scored_with" = "$baseline" ] \
         && { [ -z "$baseline" ] || [ ! $baseline/hyp.txt -nt $out/.scored ]; }; then continue; fi
      [ -z "$missing" ] || log "$out: no $missing/hyp.txt to compare with; its row has no baseline"
      lm_weight=$(json_value $out/decode_info.json lm_weight)
      length_bonus=$(json_value $out/decode_info.json length_bonus)
      parameters=$(json_value $out/decode_info.json model_parameters null)
      "$python" -m sslasr.bin.score --ref $out/ref.txt --hyp $out/hyp.txt --out-dir $out ${baseline:+--baseline $baseline} \
        --results $exp/results.jsonl --set corpus=$corpus test_set=$test_set frontend=$row_frontend \
        head=$head decoding=$method lm_weight=$lm_weight length_bonus=$length_bonus $lm_row model_parameters=$parameters \
        labeled_seconds="$(cat "$dir/labeled_seconds" 2>/dev/null || echo null)" \
        pretrained=$pretrained generation=$generation exp=$dir ${sp_tag:+speed_perturb=${speed_perturb// /,}} \
        "$@" "command=$command"
      printf '%s\n' "$baseline" > $out/.scored  # the baseline compared with ("" for none)
    done
  done
}

# Stages 5 and 6 left out (e.g. --stage 7, or --stage 9 whose first teacher is stage 5's system,
# after stages 0-3 under --force made another tokenizer, or stage 4 another pretrained model):
# their models would be decoded through files made since (pseudo-labels of another tokenizer), and
# rows would name commands they were not made by. Stop when a model's rebuilt inputs (tokenizer,
# labeled cuts, pretrained model; the LM's text) differ from those stage 5 or 6 would use now.
# Options and configs are not compared: a decode-only command need not repeat them (--tag _48k
# --finetune-opts ... trained it; --tag _48k --stage 7 decodes it).
trained_from_these() {  # trained_from_these DIR INPUTS STAGE KEY...: stop when DIR's recorded KEY lines differ
  local dir=$1 now=$2 stage_n=$3 pattern recorded; shift 3
  [ -f $dir/inputs.txt ] || return 0
  pattern="^($(IFS='|'; echo "$*")) "
  recorded=$(grep -E "$pattern" $dir/inputs.txt || :)
  now=$(printf '%s\n' "$now" | grep -E "$pattern" || :)
  [ "$recorded" != "$now" ] || return 0
  echo "$0: $dir was made from other files than stage $stage_n would use now: $(changed_inputs <(printf '%s\n' "$recorded") "$now")" >&2
  echo "$0: include stage $stage_n (--stage $stage_n) with the options it was made with, to make it again from these" >&2
  exit 2
}
checked_systems=""  # the systems decoded here: stages 7-8's, or stage 9's first teacher alone
if [ "$stage" -le 8 ] && [ "$stop_stage" -ge 7 ]; then checked_systems=$systems
elif run_stage 9 && [ "$generations" -gt 0 ]; then
  case " $systems " in *" pretrained "*) checked_systems=pretrained ;; esac
fi
if [ "$node_rank" = 0 ] && [ -n "$checked_systems" ]; then
  if [ "$stage" -gt 5 ]; then
    for system in $checked_systems; do
      inputs=$(finetuning_inputs $system "$train_cuts" $(finetune_configs $system))
      trained_from_these $(system_dir $system) "$inputs" 5 tokenizer train_cuts pretrained
    done
  fi
  if [ "$stage" -gt 6 ] && [ -f $lm_dir/.done ] && grep -q '^tokenizer ' $lm_dir/inputs.txt 2>/dev/null; then
    # (a record from before the contents were has no tokenizer line: stage 6 completes it)
    inputs=$(lm_inputs "$(cuts train)")
    trained_from_these $lm_dir "$inputs" 6 text tokenizer
  fi
fi
if run_stage 7 && [ "$node_rank" = 0 ]; then
  for system in $systems; do decode_system $(system_dir $system); done
fi

if run_stage 8 && [ "$node_rank" = 0 ]; then
  for system in $systems; do
    baseline=""  # the pretrained system against the scratch one, where both were trained
    [ $system != pretrained ] || [ "${systems% scratch}" = "$systems" ] || baseline=$(system_dir scratch)
    score_system $(system_dir $system) $system 0 "$baseline"
  done
fi

# noisy student (--generations N): generation g's teacher (the pretrained system for g = 1)
# transcribes the unlabeled pool with its best method; the filtered pseudo-labels plus the labels
# train a student from the pretrained encoder with the fine-tuning configs' noise (masking,
# dropout), conf/noisy_student.yaml merged over them; the student, decoded and scored, teaches g + 1.
# The pool (pseudo_label.pool): `unlabeled`, the corpus's untranscribed audio, and/or
# `rest_of_train`, the train utterances beyond the --labeled subset, their transcripts withheld
# from the student and used to measure the pseudo-labels (empty at --labeled all).
# On a multi-node run node 0 decodes and labels; every node trains the students.
unlabeled_pool() {  # unlabeled_pool OUT_DIR: writes OUT_DIR/pool.jsonl.gz, the audio of $pool_sources
  local out=$1 source parts="" status
  for source in $pool_sources; do
    case $source in
      unlabeled)
        if [ -z "$(present_splits unlabeled)" ]; then continue; fi  # the pool is what the corpus has
        parts="$parts $(cuts unlabeled)" ;;
      rest_of_train)
        if [ "$labeled_seconds" = all ]; then log "pseudo_label.pool: rest_of_train is empty at --labeled all"; continue; fi
        status=0
        "$python" -m sslasr.bin.cuts exclude --cuts "$(cuts train)" --ids-of "$labeled_cuts" --out $out/rest_of_train.jsonl.gz || status=$?
        if [ $status -eq 3 ]; then log "pseudo_label.pool: rest_of_train is empty (--labeled $labeled holds all of train)"; continue; fi
        [ $status -eq 0 ] || exit $status
        parts="$parts $out/rest_of_train.jsonl.gz" ;;
      *) echo "$0: pseudo_label.pool: unknown source '$source' (known: unlabeled, rest_of_train)" >&2; exit 2 ;;
    esac
  done
  [ -n "$parts" ] || { echo "$0: pseudo_label.pool ($pool_sources) holds no audio at --labeled $labeled (--generations 0: no noisy student)" >&2; exit 1; }
  "$python" -m sslasr.bin.cuts combine --out $out/pool.jsonl.gz $parts
}
tuned_fusion() {  # tuned_fusion TEACHER METHOD: the decode_info.json of TEACHER's METHOD search, λ and β
  # tuned on the validation set with $lm_dir; an LM of other contents since (stage 6 alone, more
  # --lm-text) stops the run: λ, β are another LM's (a record without the LM's hash is taken)
  local tuned=$1/decode_${valid_set}_${2/+lm/_lm}/decode_info.json recorded
  if [ ! -f $tuned ]; then  # (e.g. fine-tuned again under --force, which removed its decodes)
    echo "$0: $1 has no $2 decoding of $valid_set to take λ, β from ($tuned): include stage 7 (--stage 7)" >&2
    exit 2
  fi
  recorded=$(json_value $tuned lm_sha256 null)
  if [ "$recorded" != null ] && [ "$recorded" != "$(sha256sum < $lm_dir/model_final.pt | cut -d' ' -f1)" ]; then
    echo "$0: $lm_dir was trained again after $1's decoding tuned λ, β with it ($tuned): include stage 7 (--stage 7)" >&2
    exit 2
  fi
  echo $tuned
}
pseudo_label() {  # pseudo_label TEACHER_DIR OUT_DIR: decode the unlabeled pool (+ valid set), filter
  local teacher=$1 out=$2 method beam fusion="" tuned weight bonus lexicon reference=()
  method=$(pseudo_label_method $teacher)
  beam=$(noisy_student_setting beam_size "")
  if ! uses_lm $method; then :
  elif [ "$pseudo_label_lm_dir" = "$lm_dir" ]; then  # the teacher's λ, β, as tuned on the validation set
    tuned=$(tuned_fusion $teacher $method)
    weight=$(json_value $tuned lm_weight); bonus=$(json_value $tuned length_bonus)
    fusion="--lm $lm_dir/model_final.pt --lm-weight $weight --length-bonus $bonus"
  else  # another LM: λ, β tuned with it on the validation set, decoded here anyway
    fusion="--lm $pseudo_label_lm_dir/model_final.pt --tune-on $valid_set"
  fi
  lexicon=$(lexicon_opts $pseudo_label_lm_dir $method)  # its error stops here
  mkdir -p $out
  unlabeled_pool $out
  log "pseudo-labelling the pool and $valid_set with $teacher ($method)"
  "$python" -m sslasr.bin.decode --model $teacher/model_final.pt --confidence --methods $method \
    --cuts unlabeled=$out/pool.jsonl.gz $valid_set="$(cuts $valid_set)" --out-dir "$out/decode_{set}" \
    ${beam:+--beam-size $beam} $fusion $lexicon $decode_opts
  [ ! -f "$corpus_dir/unlabeled/text.reference" ] || reference=(--reference "$corpus_dir/unlabeled/text.reference")
  "$python" -m sslasr.bin.pseudo_label --cuts $out/pool.jsonl.gz --decode-dir $out/decode_unlabeled \
    --labeled-cuts "$labeled_cuts" --config $noisy_student_configs ${reference[@]+"${reference[@]}"} \
    --out-cuts $out/pseudo_labeled.jsonl.gz --report $out/report.json
  # the same filter on transcribed audio: how good the kept pseudo-labels are where the truth is known
  # (cut at the pool's score: keep_fraction of the valid set would rank it on its own)
  "$python" -m sslasr.bin.pseudo_label --cuts "$(cuts $valid_set)" --decode-dir $out/decode_$valid_set \
    --labeled-cuts "$labeled_cuts" --config $noisy_student_configs --report $out/report_$valid_set.json \
    --score-cutoff-of $out/report.json
}
pseudo_label_method() {  # pseudo_label_method TEACHER: noisy_student.yaml's method, else the teacher's last
  local methods
  methods=$(decode_methods $1)  # a failure stops here
  noisy_student_setting method "${methods##* }"
}
pseudo_label_inputs() {  # pseudo_label_inputs TEACHER: what its pseudo-labels are made from, beside its model and LM
  local method tuned weight bonus  # each step's failure returns: no errexit inside $(...)
  method=$(pseudo_label_method $1) || return 1
  "$python" - $noisy_student_configs <<'EOF' || return 1
import json, sys
from sslasr.utils.config import load_configs
print("settings", json.dumps(load_configs(sys.argv[1:]).get("pseudo_label") or {}, sort_keys=True))
EOF
  echo "labeled $labeled_cuts $(content_hash "$labeled_cuts")"
  echo "pool $pool_digest"  # more unlabeled audio since (stage 1 again): another pool
  if uses_lm $method && [ "$pseudo_label_lm_dir" = "$lm_dir" ]; then
    tuned=$(tuned_fusion $1 $method) || return 1
    weight=$(json_value $tuned lm_weight) && bonus=$(json_value $tuned length_bonus) || return 1
    echo "fusion $weight $bonus"  # the teacher's, as tuned
  fi
  echo "decode_opts $(hypothesis_decode_opts)"
}
hypothesis_decode_opts() {  # the --decode-opts that can change a hypothesis: less where, and how fast, it runs
  local a kept=() skip=false
  for a in $decode_opts; do
    if $skip; then skip=false; continue; fi
    case $a in
      --max-duration|--num-threads|--device) skip=true ;;  # (a batch decodes as its utterances do alone)
      --max-duration=*|--num-threads=*|--device=*) ;;
      *) kept+=("$a") ;;
    esac
  done
  echo "${kept[*]-}"
}
hypothesis_record() {  # hypothesis_record FILE: a pseudo-label record, its decode_opts line as written now
  local line
  while IFS= read -r line; do
    case $line in
      "decode_opts "*) echo "decode_opts $(decode_opts=${line#decode_opts } hypothesis_decode_opts)" ;;
      *) printf '%s\n' "$line" ;;
    esac
  done < $1
}
comparable_inputs() {  # comparable_inputs RECORD INPUTS: INPUTS as pseudo-labels' RECORD (inputs.txt) can name
  # them: without the pool line for a record from before it
  if grep -q '^pool ' $1; then printf '%s\n' "$2"; else printf '%s\n' "$2" | grep -v '^pool '; fi
}
label_record_matches() {  # label_record_matches RECORD INPUTS: pseudo-labels' RECORD (inputs.txt) names INPUTS
  # (a record from before the decode_opts line left out --num-threads and the like: read without them)
  [ "$(hypothesis_record $1)" = "$(comparable_inputs $1 "$2")" ]
}
pseudo_labels_outdated() {  # pseudo_labels_outdated TEACHER LABELS INPUTS: why LABELS are not TEACHER's current ones
  local teacher=$1 labels=$2 method made=$2/.done
  [ -d $labels ] || return 1
  # the filter, the pool, its search or the labeled cuts changed (a record from before: not checked)
  if [ -f $labels/inputs.txt ] && ! label_record_matches $labels/inputs.txt "$3"; then
    echo "its inputs changed ($(changed_inputs $labels/inputs.txt "$(comparable_inputs $labels/inputs.txt "$3")"))"; return 0
  fi
  # a killed labelling's folder (its time: when it was last written to): decode would resume its sets
  [ -f $made ] || made=$labels
  if [ $teacher/model_final.pt -nt $made ]; then echo "$teacher changed"; return 0; fi
  method=$(pseudo_label_method $teacher)
  # the search read the LM or its lexicon: trained again since?
  if newer_input $made $(search_lm_files $method); then
    echo "$pseudo_label_lm_dir (the $method search's LM and lexicon) changed"; return 0
  fi
  return 1
}
search_lm_files() {  # search_lm_files METHOD: the files of stage 9's LM dir that METHOD's search reads
  ! uses_lm $1 || echo $pseudo_label_lm_dir/.done
  ! uses_lexicon $1 || echo $pseudo_label_lm_dir/words.txt
}
student_inputs() {  # student_inputs LABELS: what a noisy student is made from (made_from)
  finetuning_inputs pretrained $1/student_train.jsonl.gz $(finetune_configs pretrained) $noisy_student_configs
}
train_student() {  # train_student STUDENT LABELS: from the pretrained encoder, on the labels + LABELS' pseudo-labels
  train $1 --config $(finetune_configs pretrained) $noisy_student_configs --set task=asr \
    data.train_cuts=$2/student_train.jsonl.gz data.valid_cuts="$(cuts $valid_set)" \
    data.tokenizer=$lang/bpe.model finetune.init_from=$pretrain_dir/model_final.pt $finetune_opts
}
student_ready() {  # student_ready STUDENT: trained on its current pseudo-labels (every node decides alike)
  [ "$force" != true ] && [ -f $1/.done ] && [ ! $1/pseudo_labels/.done -nt $1/.done ]
}
student_stale() {  # student_stale STUDENT: trained, but on earlier pseudo-labels (node 0 resets it)
  [ "$force" != true ] && [ -f $1/.done ] && [ $1/pseudo_labels/.done -nt $1/.done ]
}
pseudo_labels_match() {  # pseudo_labels_match TEACHER LABELS: LABELS made from TEACHER's current settings (node 0
  # writes inputs.txt as it starts labelling; labels without one are from before inputs were recorded: taken)
  local now
  [ -f $2/inputs.txt ] || return 0
  now=$(pseudo_label_inputs $1 2>/dev/null) || return 1  # (a teacher decode not there yet: look again)
  # --decode-opts too: with new ones node 0 decodes the teacher again in stage 7 (new λ, β) while
  # this node, past stages 7-8, would take the teacher's old decoding and the labels made with it
  if ! label_record_matches $2/inputs.txt "$now"; then
    if [ $2/.done -nt $2/inputs.txt ] && [ $2/inputs.txt -nt "$started_stamp" ]; then  # made in this run
      log "node $node_rank: node 0 made $2 from other settings than this node's ($(changed_inputs $2/inputs.txt "$(comparable_inputs $2/inputs.txt "$now")"));" \
          "run every node with the same options (--launcher's --node_rank aside)"
      exit 1
    fi
    return 1
  fi
  [ ! $2/inputs.txt -nt $2/.done ]
}
join_student_training() {  # join_student_training G TEACHER STUDENT: another node's share of generation G
  local g=$1 teacher=$2 student=$3 labels=$3/pseudo_labels method inputs made_of
  # pseudo-labels older than the teacher (its model, or its .done, which node 0 touches before it
  # labels with it) or the search's LM are an earlier teacher's: node 0 makes them again
  wait_for_node_0 $teacher/.done "generation $((g - 1)) model ($teacher)"
  method=$(pseudo_label_method $teacher)
  inputs=($teacher/model_final.pt $teacher/.done $(search_lm_files $method))
  # under --force node 0 labels again: only pseudo-labels made since it started are this run's
  node0_run_start
  [ "$force" != true ] || inputs+=($forced_since)
  local ready_also="pseudo_labels_match $teacher $labels"  # ... and from this run's settings
  wait_for_node_0 $labels/.done "generation $g pseudo-labels" "${inputs[@]}"
  ready_also=""
  if student_ready $student; then log "node $node_rank: generation $g: student ready"; return; fi
  if ! student_stale $student; then  # a stale one node 0 resets, its inputs.txt with it
    made_of=$(student_inputs $labels)  # a failure stops here
    made_from $student "$made_of"
  fi
  log "node $node_rank: generation $g: training the noisy student $student with the other nodes"
  train_student $student $labels
}
if run_stage 9 && [ "$generations" -gt 0 ]; then
  teacher=$(system_dir pretrained)
  if [ "$node_rank" != 0 ]; then
    for g in $(seq 1 "$generations"); do
      join_student_training $g $teacher $noisy_student_dir/gen$g
      teacher=$noisy_student_dir/gen$g
    done
    exit 0
  fi
  taught_by=$teacher  # dirs whose commands made the student (teachers, pseudo-labels, their LM): named in its rows
  if [ ! -f $teacher/.decode.done ] || [ $teacher/model_final.pt -nt $teacher/.decode.done ]; then
    log "WARNING: $teacher is not decoded since it was trained (include stage 7): generation 1's rows have" \
      "no baseline, and RESULTS.md's teacher WER is that of its last decoded model"
  fi
  for g in $(seq 1 "$generations"); do
    student=$noisy_student_dir/gen$g
    labels=$student/pseudo_labels
    method=$(pseudo_label_method $teacher)  # a failure stops here
    if uses_lm $method && [ "$pseudo_label_lm_dir" = "$lm_dir" ]; then
      tuned_fusion $teacher $method > /dev/null  # before anything is reset: a refusal loses nothing
    fi
    label_inputs=$(pseudo_label_inputs $teacher)  # a failure stops here
    if outdated=$(pseudo_labels_outdated $teacher $labels "$label_inputs"); then
      # e.g. the teacher fine-tuned again (--force), the LM trained on more text (--lm-text), another
      # keep_fraction: the pseudo-labels, and the student, are another teacher's or filter's
      log "generation $g: $outdated after its pseudo-labels were made: labelling and training the student again"
      rm -rf $labels
      reset_training $student
    fi
    if done_or_force $labels/.done; then log "generation $g: pseudo-labels ready"; else
      # decode keeps the sets it finished (resuming a kill): under --force, the old teacher's would stay
      [ "$force" != true ] || rm -rf $labels
      record_inputs $labels "$label_inputs"  # a killed labelling's too
      pseudo_label $teacher $labels
      "$python" -m sslasr.bin.cuts combine --out $labels/student_train.jsonl.gz "$train_cuts" $labels/pseudo_labeled.jsonl.gz
      note_command $labels pseudo-labelled
      touch $labels/.done
    fi
    method=$(pseudo_label_method $teacher)
    if uses_lm $method || uses_lexicon $method; then taught_by="$taught_by $pseudo_label_lm_dir"; fi
    taught_by="$taught_by $labels"
    if student_stale $student; then
      # e.g. its pseudo-labels were removed and made again: another student's (before made_from,
      # which would refuse its inputs.txt of the earlier labels)
      log "generation $g: its pseudo-labels were made after the student: training it again"
      reset_training $student
    fi
    inputs=$(student_inputs $labels)  # a failure stops here
    made_from $student "$inputs"  # (under --force: the student reset)
    if student_ready $student; then log "generation $g: student ready"; else
      log "generation $g: training the noisy student $student"
      train_student $student $labels
      "$python" -m sslasr.bin.cuts seconds "$labeled_cuts" > $student/labeled_seconds
      note_command $student fine-tuned
      touch $student/.done
    fi
    decode_system $student
    kept=$(json_value $labels/report.json kept_seconds)
    kept_wer=$(json_value $labels/report.json wer_kept null)  # null: no reference for the pool
    valid_wer=$(json_value $labels/report_$valid_set.json wer_kept)
    upstream=$taught_by score_system $student pretrained $g $teacher teacher=$teacher pseudo_label_seconds=$kept \
      pseudo_label_wer=$kept_wer pseudo_label_${valid_set}_wer=$valid_wer
    taught_by="$taught_by $student"
    teacher=$student
  done
fi

if run_stage 10 && [ "$node_rank" = 0 ]; then
  "$python" -m sslasr.bin.render_results --results $exp/results.jsonl --archive RESULTS.jsonl \
    --out RESULTS.md --title "$corpus results"
  log "wrote RESULTS.md"
fi
