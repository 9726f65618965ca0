"""The command line's edge, shared by every script: one-line errors (UserError, run_cli), Ctrl-C and SIGTERM,
the argument parser and its number types (the only home of "must be positive"), and output paths checked before
any work.
"""
import argparse
import math
import os
import signal
import sys
from pathlib import Path


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2, never a traceback."""


def interrupt(signum, frame):
    """A signal handler: stop like Ctrl-C does, naming the signal."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run_cli(main):
    """Run `main()` as a command: UserError -> `error: ...` on stderr and exit 2; Ctrl-C or SIGTERM (outside
    a training loop, which saves first) -> `interrupted (SIGNAL)` and exit 128 + the signal's number. Anything
    else is a bug and keeps its traceback."""
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        status = main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as err:
        name = str(err) if str(err) in signal.Signals.__members__ else "SIGINT"  # interrupt() names the signal
        print(f"interrupted ({name})", file=sys.stderr)
        sys.exit(128 + signal.Signals[name])
    finally:
        signal.signal(signal.SIGTERM, previous)
    sys.exit(status or 0)


def require_file(path, what):
    """Return `path` as a Path, or raise UserError naming `what` if it is not a file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    return path


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with the project's error style: an unknown flag or a bad value raises UserError, which
    run_cli prints as one `error: ...` line pointing at `SCRIPT -h` (exit 2), instead of argparse's usage block.
    `script` is the script's `__file__`: its name is the program name, however the script was started."""

    def __init__(self, script, **kwargs):
        super().__init__(prog=Path(script).name, **kwargs)

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} -h)")


def check_output_folder(path, flag):
    """Before any work, creating nothing: folder `path` must exist or be creatable, and be writable; else a
    UserError naming `flag` (rather than a traceback once the results are ready to be saved)."""
    folder = Path(path)
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{flag} {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {flag} {folder}: {existing} is not writable")
    return folder


def check_output_file(path, flag):
    """check_output_folder for the folder of file `path`, which must not be a folder itself."""
    if Path(path).is_dir():
        raise UserError(f"{flag} {path} is a folder: give a file name")
    check_output_folder(Path(path).absolute().parent, flag)


def int_list(text):
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def at_least(minimum, kind=int, inclusive=True):
    """An argparse `type=`: text -> a finite `kind` (int or float) >= minimum (> minimum unless `inclusive`).
    Anything else is an argparse error naming the bound, e.g. `argument --steps: must be at least 1, got 0`."""
    bound = f"{'at least' if inclusive else 'greater than'} {minimum}"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return parse


positive_int = at_least(1)
non_negative_int = at_least(0)
positive_float = at_least(0, float, inclusive=False)
non_negative_float = at_least(0, float)
