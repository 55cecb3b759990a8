"""local/parse_options.sh: the option parser of the stage driver and every local/data.sh."""

import subprocess
from pathlib import Path

PARSER = Path(__file__).resolve().parents[1] / "local" / "parse_options.sh"


def parse(*args: str, extra: bool = False) -> subprocess.CompletedProcess:
    script = ("set -euo pipefail\nstage=0\nlm_text=''\n" + ("extra_args=()\n" if extra else "")
              + f'. {PARSER} "$@"\n'
              + 'echo "stage=$stage lm_text=$lm_text"\n'
              + ('printf "[%s]" "${extra_args[@]}"; echo\n' if extra else ""))
    return subprocess.run(["bash", "-c", script, "script", *args], capture_output=True, text=True)


def test_declared_options_are_set_in_both_spellings():
    result = parse("--stage", "5", "--lm-text=a b.txt")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "stage=5 lm_text=a b.txt"


def test_undeclared_options_and_missing_values_are_errors():
    for args, message in [(("--bogus", "1"), "unknown option --bogus"), (("--stage",), "--stage needs a value"),
                          (("stray",), "unexpected argument 'stray'")]:
        result = parse(*args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)


def test_extra_args_collect_undeclared_options_with_their_values():
    result = parse("--num-train", "3", "--flag", "--stage", "2", "--seed=7", "--snr-range", "10", "30", extra=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # an option of several values (argparse's nargs=2) keeps them all: the second was "unexpected"
    assert lines == ["stage=2 lm_text=", "[--num-train][3][--flag][--seed=7][--snr-range][10][30]"]
