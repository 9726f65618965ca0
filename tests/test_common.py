"""common.py: atomic writes (all or nothing, no temporary files left behind, a normal file mode) and the command
entry point's handling of signals."""
import os
import signal
import stat
import time

import pytest

from common import atomic_write, atomic_write_json, read_json, run_cli


def test_atomic_write_is_all_or_nothing_and_leaves_a_normal_file(tmp_path):
    path = tmp_path / "config.json"
    atomic_write_json(path, {"a": 1})

    def torn(f):
        f.write(b'{"a": ')
        raise KeyboardInterrupt  # a crash half way through the write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, torn)
    assert read_json(path) == {"a": 1} and os.listdir(tmp_path) == ["config.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's private 0600


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
