"""The stage driver's own checks of its options: a corpus's presets (frontend, vocab_size, ...) are
read as ${name:-default}, so the same names exported in the user's shell are refused rather than
taken as presets unseen; counts must be whole numbers."""

import os
import shutil
import subprocess
import sys
import time

from recipe_smoke import REPO, recipe_copy


def run_with_environment(recipe, **exported):
    env = dict(os.environ, SSLASR_PYTHON=sys.executable, **exported)
    return subprocess.run(["./run.sh", "--stage", "100"], cwd=recipe, env=env, capture_output=True, text=True,
                          timeout=60)


def test_an_exported_preset_is_refused_naming_the_option_to_use(tmp_path):
    recipe = recipe_copy(tmp_path)
    assert run_with_environment(recipe).returncode == 0  # nothing exported: nothing refused
    for name, option in [("frontend", "--frontend"), ("vocab_size", "--vocab-size"), ("conf_dir", "--conf-dir")]:
        refused = run_with_environment(recipe, **{name: "hubert"})
        assert refused.returncode == 2, (name, refused.stderr)
        assert f"'{name}' is exported in the environment" in refused.stderr and f"pass {option} instead" in refused.stderr


def test_decode_opts_may_not_set_what_the_driver_sets(tmp_path):
    """argparse keeps the last of an option given twice: --decode-opts "--tune-on test" tuned the
    LM weight on the test set, and the rows did not say so."""
    recipe = recipe_copy(tmp_path)
    env = dict(os.environ, SSLASR_PYTHON=sys.executable)
    for opts in ("--tune-on test", "--beam-size 8 --methods ctc_greedy", "--out-dir=elsewhere"):
        refused = subprocess.run(["./run.sh", "--stage", "100", "--decode-opts", opts], cwd=recipe, env=env,
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and "is the driver's to set" in refused.stderr, (opts, refused.stderr)
    allowed = subprocess.run(["./run.sh", "--stage", "100", "--decode-opts", "--beam-size 8 --tune-lm-weights 0.5 1"],
                             cwd=recipe, env=env, capture_output=True, text=True, timeout=60)
    assert allowed.returncode == 0, allowed.stderr


def test_a_count_option_that_is_not_a_whole_number_is_refused(tmp_path):
    """--generations x used to reach `[ x -gt 0 ]`: bash printed an error and the stages went on."""
    recipe = recipe_copy(tmp_path)
    env = dict(os.environ, SSLASR_PYTHON=sys.executable)
    for option, value in [("--generations", "x"), ("--stop-stage", "5.5"), ("--nproc", "-1"), ("--nj", "")]:
        refused = subprocess.run(["./run.sh", "--stage", "100", option, value], cwd=recipe, env=env,
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2, (option, refused.stderr)
        assert f"{option} {value}: not a whole number" in refused.stderr
    assert run_with_environment(recipe).returncode == 0


def test_labeled_amounts_and_lm_text_files_are_checked_before_any_stage(tmp_path):
    """--labeled 30s failed in stage 5, after pretraining, and 010m was read as octal (480 s); an
    --lm-text path that is not there was recorded without contents and reset the trained LM."""
    recipe = recipe_copy(tmp_path)
    env = dict(os.environ, SSLASR_PYTHON=sys.executable)

    def run(*args):
        return subprocess.run(["./run.sh", "--stage", "100", *args], cwd=recipe, env=env, capture_output=True,
                              text=True, timeout=60)

    for value in ("30s", "1.5h", "1H", ""):
        refused = run("--labeled", value)
        assert refused.returncode == 2 and f"--labeled {value}: all, or N, Nm or Nh" in refused.stderr, refused.stderr
    for value in ("all", "600", "10m", "1h"):
        assert run("--labeled", value).returncode == 0, value
    refused = run("--lm-text", "more.txt")
    assert refused.returncode == 2, refused.stderr
    assert f"--lm-text more.txt: no readable file (relative paths are read from {recipe})" in refused.stderr
    (recipe / "more.txt").write_text("more text\n")
    assert run("--lm-text", "more.txt").returncode == 0
    seconds = subprocess.run(["bash", "-c", f"source <(sed -n '/^seconds_of()/,/^}}/p' {recipe.parents[1]}/local/ssl_asr.sh)"
                              "; seconds_of 010m; seconds_of 08"], capture_output=True, text=True)
    assert seconds.stdout.split() == ["600", "8"], seconds.stderr


def test_a_pretrain_tag_that_names_a_model_sizes_dirs_is_refused(tmp_path):
    """--pretrain-tag _large wrote into exp/pretrain_wav2vec2_large, the --model-size large run's."""
    recipe = recipe_copy(tmp_path)
    env = dict(os.environ, SSLASR_PYTHON=sys.executable)
    (recipe / "conf/frontend_wav2vec2_large.yaml").write_text("_base_: frontend_wav2vec2.yaml\n")
    refused = subprocess.run(["./run.sh", "--stage", "100", "--pretrain-tag", "_large"], cwd=recipe, env=env,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2, refused.stderr
    assert "--pretrain-tag _large names exp dirs of --model-size large (conf/frontend_wav2vec2_large.yaml)" in refused.stderr
    for tagged in (["--pretrain-tag", "_large_x"], ["--model-size", "large", "--pretrain-tag", "_x"]):
        # both name exp/pretrain_wav2vec2_large_x: the untagged size's variant is refused, the sized run's taken
        run = subprocess.run(["./run.sh", "--stage", "100", *tagged], cwd=recipe, env=env, capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == (2 if "--model-size" not in tagged else 0), (tagged, run.stderr)
    taken = subprocess.run(["./run.sh", "--stage", "100", "--pretrain-tag", "_12k"], cwd=recipe, env=env,
                           capture_output=True, text=True, timeout=60)
    assert taken.returncode == 0, taken.stderr


def test_an_apt_failure_for_espeak_ng_alone_does_not_stop_the_install(tmp_path):
    """As root on a machine without the Debian mirror, apt-get's failure stopped install.sh (set -e),
    and with it test.sh and CI, though pip could install everything from local wheels."""
    shutil.copytree(REPO / "tools", tmp_path / "tools")
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text(f'#!/bin/sh\ncase "$*" in *" install "*) echo "$*" >> {tmp_path}/installs ;; esac\n'
                                     f'exec {sys.executable} "$@"\n')
    (venv_bin / "python").chmod(0o755)
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    # installed: only the system packages are wanted
    (tmp_path / ".venv" / ".sslasr-installed").write_text(f"python {sys.version_info[0]}.{sys.version_info[1]}\n")
    path = tmp_path / "path"  # the tools install.sh runs, without espeak-ng; apt-get fails; root
    path.mkdir()
    for tool in ("bash", "dirname", "mktemp", "rm", "touch", "grep", "env", "cat"):
        (path / tool).symlink_to(shutil.which(tool))
    (path / "python3").symlink_to(sys.executable)
    for fake, text in (("id", "echo 0"), ("apt-get", "echo 'E: no mirror' >&2; exit 100")):
        (path / fake).write_text(f"#!{shutil.which('bash')}\n{text}\n")
        (path / fake).chmod(0o755)
    result = subprocess.run([shutil.which("bash"), str(tmp_path / "tools/install.sh")], capture_output=True,
                            text=True, env={"PATH": str(path), "HOME": str(tmp_path)}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "apt-get could not install espeak-ng" in result.stderr and "install.sh: ready" in result.stdout
    # a stamp from before it named the Python, beside a working install: named now, not installed again
    stamp = tmp_path / ".venv" / ".sslasr-installed"
    stamp.write_text("")
    earlier = time.time() - 60
    os.utime(tmp_path / "pyproject.toml", (earlier, earlier))
    result = subprocess.run([shutil.which("bash"), str(tmp_path / "tools/install.sh")], capture_output=True,
                            text=True, env={"PATH": str(path), "HOME": str(tmp_path)}, timeout=120)
    assert result.returncode == 0 and "install.sh: ready" in result.stdout, result.stderr
    assert stamp.read_text() == f"python {sys.version_info[0]}.{sys.version_info[1]}\n"
    assert not (tmp_path / "installs").exists()  # (pip is asked for nothing, either run)
    # ... but where the .venv cannot import the package (its Python upgraded in place), installed again
    stamp.write_text("")
    os.utime(tmp_path / "pyproject.toml", (earlier, earlier))
    python = (venv_bin / "python").read_text()
    (venv_bin / "python").write_text(python.replace('case "$*" in', 'case "$*" in *"import sslasr"*) exit 1 ;;', 1))
    result = subprocess.run([shutil.which("bash"), str(tmp_path / "tools/install.sh")], capture_output=True,
                            text=True, env={"PATH": str(path), "HOME": str(tmp_path)}, timeout=120)
    assert (tmp_path / "installs").exists(), result.stderr


def test_the_install_runs_where_it_is_missing_or_older_than_pyproject(tmp_path):
    """It ran only when .venv/bin/python was missing: a .venv made for one's own torch first (as the
    README says to do with a GPU) never got sslasr, and a dependency added since was never installed.
    A .venv whose interpreter was upgraded in place kept its stamp but lost its packages."""
    import time
    recipe = recipe_copy(tmp_path)
    install = tmp_path / "tools" / "install.sh"
    install.parent.mkdir()
    install.write_text('#!/usr/bin/env bash\necho ran >> "$(dirname "$0")/installs"\n'
                       f'echo "python {sys.version_info[0]}.{sys.version_info[1]}" > "$(dirname "$0")/../.venv/.sslasr-installed"\n')
    install.chmod(0o755)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    venv_python = tmp_path / ".venv" / "bin" / "python"  # a .venv with one's own torch
    venv_python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    venv_python.chmod(0o755)
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    env = {k: v for k, v in os.environ.items() if k != "SSLASR_PYTHON"}

    def installs() -> int:
        result = subprocess.run(["./run.sh", "--stage", "100"], cwd=recipe, env=env, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stderr
        return len((tmp_path / "tools" / "installs").read_text().split()) if (tmp_path / "tools/installs").exists() else 0

    stamp = tmp_path / ".venv" / ".sslasr-installed"
    assert installs() == 1 and stamp.exists()  # no stamp: installed
    assert installs() == 1  # the stamp: nothing to do
    earlier = time.time() - 60
    os.utime(stamp, (earlier, earlier))  # pyproject.toml changed since: a dependency added
    assert installs() == 2
    assert installs() == 2
    stamp.write_text("python 2.7\n")  # the .venv's interpreter upgraded in place: its packages are gone
    assert installs() == 3
    assert installs() == 3
    os.utime(stamp, (earlier, earlier))
    assert run_with_environment(recipe).returncode == 0  # SSLASR_PYTHON: a python of one's own, left alone
    assert len((tmp_path / "tools" / "installs").read_text().split()) == 3
