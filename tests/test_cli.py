"""cli.py: the command entry point's handling of signals, and argument parsing (number ranges, one-line errors
from every script)."""
import argparse
import importlib
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from cli import at_least, non_negative_float, non_negative_int, positive_float, positive_int, run_cli
from conftest import ROOT


def test_run_cli_reports_sigterm_in_one_line_and_exits_143(capsys):
    """A SIGTERM outside a training loop (e.g. while the latent cache is built) stops with a message, not silently,
    and the previous SIGTERM handler is back afterwards."""
    before = signal.getsignal(signal.SIGTERM)

    def main():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the handler raises in here
        return 0

    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main)
    assert exit_info.value.code == 128 + signal.SIGTERM and time.perf_counter() - start < 5
    assert capsys.readouterr().err == "interrupted (SIGTERM)\n"
    assert signal.getsignal(signal.SIGTERM) is before


# ----------------------------------------------------------------------------------------------
# Command-line arguments: one home for "must be positive", one line for every argparse error


def test_number_types_accept_their_range_and_name_the_bound():
    assert positive_int("3") == 3 and non_negative_int("0") == 0 and at_least(2)("2") == 2
    assert positive_float("1e-4") == 1e-4 and non_negative_float("0") == 0.0
    for parse, text, message in [(positive_int, "0", "must be at least 1, got 0"),
                                 (non_negative_int, "-1", "must be at least 0, got -1"),
                                 (at_least(2), "1", "must be at least 2, got 1"),
                                 (positive_float, "0", "must be greater than 0, got 0"),
                                 (non_negative_float, "-0.5", "must be at least 0, got -0.5"),
                                 (non_negative_float, "nan", "must be at least 0, got nan"),
                                 (positive_float, "inf", "must be greater than 0, got inf"),
                                 (positive_int, "1.5", "expected an integer, got '1.5'"),
                                 (positive_float, "x", "expected a number, got 'x'")]:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
            parse(text)


BAD_ARGUMENTS = {  # script -> an argument list argparse rejects
    "bench": ["--repeats", "0"],
    "diffusion": ["--steps", "x"],
    "download_hf": ["--dataset_name", "d", "--url_key", "u", "--workers", "0"],
    "evaluate": ["--real", "r", "--fake", "f", "--n", "1"],
    "trainer": ["--dataset_path", "d", "--vqgan_ckpt", "v", "--batch_size", "-3"],
    "vqgan": ["--out", "o", "--no_such_flag"],
    "text_encoder": ["--max_length", "0"],
    "unet": ["--size", "gigantic"],
}


@pytest.mark.parametrize("script", sorted(BAD_ARGUMENTS))
def test_argparse_errors_are_one_line_pointing_at_help(script, capsys):
    """The README promises one `error: ...` line and exit status 2: not argparse's usage block."""
    main = importlib.import_module(script).main
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(BAD_ARGUMENTS[script]))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: ") and err.endswith(f"(see {script}.py -h)\n")


def test_a_bad_choice_on_the_command_line_is_one_line_naming_the_script():
    result = subprocess.run([sys.executable, "unet.py", "--size", "gigantic"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert re.fullmatch(r"error: argument --size: invalid choice: 'gigantic' \(choose from .*\) \(see unet.py -h\)\n",
                        result.stderr)
