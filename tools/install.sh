#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: system packages, a .venv with CPU torch pinned,
# and sslasr with its test extras.  Users with GPUs install their own torch into .venv first;
# an already-present torch is kept.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

need_apt=()
command -v espeak-ng >/dev/null 2>&1 || need_apt+=(espeak-ng)
python=${PYTHON:-python3}
"$python" -c "import ensurepip" >/dev/null 2>&1 || [ -x .venv/bin/python ] || need_apt+=(python3-venv)
sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
if [ ${#need_apt[@]} -gt 0 ] && [ -n "$sudo_cmd" ] && ! sudo -n true 2>/dev/null; then
  # not root, and no password-less sudo: the Python side installs anyway (the tests that need
  # espeak-ng skip; the minisynth recipe says what it lacks)
  echo "install.sh: cannot install ${need_apt[*]} (not root, no password-less sudo): install them yourself" >&2
elif [ ${#need_apt[@]} -gt 0 ]; then
  echo "install.sh: installing ${need_apt[*]} with apt-get"
  if ! { $sudo_cmd apt-get update -qq \
         && $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null; }; then
    # (offline, say: pip may still install from the local wheel folders pip.conf names)
    echo "install.sh: apt-get could not install ${need_apt[*]}" >&2
    case " ${need_apt[*]} " in *" python3-venv "*) exit 1 ;; esac  # no .venv without it
    echo "install.sh: going on without espeak-ng (the tests that need it skip; the minisynth recipe needs it)" >&2
  fi
fi

# A .venv left without pip (venv killed during ensurepip, or made without python3-venv) gets it
# now; one of another Python than $python is kept (it may hold a user's own torch), but said.
[ -x .venv/bin/python ] || "$python" -m venv .venv
py=.venv/bin/python
$py -m pip --version >/dev/null 2>&1 || $py -m ensurepip --upgrade >/dev/null
venv_version=$($py -c 'import sys; print("%d.%d" % sys.version_info[:2])')
wanted_version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo "$venv_version")
[ "$venv_version" = "$wanted_version" ] || echo "install.sh: .venv is Python $venv_version, $python is $wanted_version: keeping .venv (remove it to rebuild)" >&2
pip_install() {  # this machine's pip.conf names local wheel folders that may be absent: hide that noise
  "$py" -m pip --disable-pip-version-check -q install "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

# torch first, pinned, and the CPU build: PyPI's Linux wheel is the CUDA one, with several GB of
# nvidia-* packages. From PyTorch's CPU index; where that cannot be reached, what pip finds
# otherwise (a local wheel folder that pip.conf names, else PyPI).
if ! $py -c "import torch" >/dev/null 2>&1; then
  pip_install --retries 1 --timeout 15 --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" \
      2> >(grep -v "Retrying (Retry(" >&2) \
    || { echo "install.sh: PyTorch's CPU index failed: torch==2.13.0 from the other sources" >&2; pip_install "torch==2.13.0"; }
  pip_install numpy
fi
torch_version=$($py -c "import torch; print(torch.__version__.split('+')[0])")
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==${torch_version}" > "$constraints"

# The stamp names the .venv's Python: one whose interpreter was upgraded in place or made again
# (python3 -m venv over a .venv whose interpreter was removed) has none of the packages the stamp
# vouched for. local/ssl_asr.sh compares the same line.
stamp=.venv/.sslasr-installed
if [ -f "$stamp" ] && [ ! -s "$stamp" ] && [ ! pyproject.toml -nt "$stamp" ] && $py -I -c "import sslasr, lhotse" 2>/dev/null; then
  # (-I: not the source tree beside it, which imports from the checkout without any install)
  echo "python $venv_version" > "$stamp"  # a stamp from before it named the Python: the install holds
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$(cat "$stamp")" != "python $venv_version" ]; then
  pip_install -c "$constraints" -e ".[test]"
  echo "python $venv_version" > "$stamp"
fi
echo "install.sh: ready ($($py -c 'import torch, sslasr; print("torch", torch.__version__, "sslasr", sslasr.__version__)'))"
