"""common.py's atomic writes: all or nothing, no temporary files left behind, a normal file mode."""
import os
import stat

import pytest

from common import atomic_write, atomic_write_json, read_json


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
