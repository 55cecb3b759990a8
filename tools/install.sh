#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: system packages, a .venv with CPU torch pinned,
# and sslasr with its test extras.  Users with GPUs install their own torch into .venv first;
# an already-present torch is kept.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

need_apt=()
command -v espeak-ng >/dev/null 2>&1 || need_apt+=(espeak-ng)
command -v sox >/dev/null 2>&1 || need_apt+=(sox)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "install.sh: installing ${need_apt[*]} with apt-get"
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
py=.venv/bin/python
pip_install() {  # this machine's pip.conf names local wheel folders that may be absent: hide that noise
  "$py" -m pip --disable-pip-version-check -q install "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

# torch first and pinned: any other version pulls a multi-GB CUDA stack on a CPU machine.
if ! $py -c "import torch" >/dev/null 2>&1; then
  pip_install "torch==2.13.0" numpy
fi
torch_version=$($py -c "import torch; print(torch.__version__.split('+')[0])")
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==${torch_version}" > "$constraints"

stamp=.venv/.sslasr-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  pip_install -c "$constraints" -e ".[test]"
  touch "$stamp"
fi
echo "install.sh: ready ($($py -c 'import torch, sslasr; print("torch", torch.__version__, "sslasr", sslasr.__version__)'))"
