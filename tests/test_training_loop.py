"""training_loop.py: the log a resumed run repairs, and the data order."""
import pytest
import torch

from cli import UserError
from training_loop import append_log, epoch_order, read_log, trim_log


def test_a_torn_last_log_line_is_dropped_and_trim_log_repairs_the_file(tmp_path):
    log = tmp_path / "log.jsonl"
    for step in (1, 2, 3):
        append_log(log, {"step": step, "loss": 1.0 / step})
    with open(log, "a") as f:
        f.write('{"step": 4, "lo')  # a kill half way through a line
    assert [e["step"] for e in read_log(log)] == [1, 2, 3]
    trim_log(log, 2)
    assert log.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n'
    log.write_text('{"step": 1}\nnot json\n{"step": 3}\n')  # damage in the middle is not a torn write
    with pytest.raises(UserError, match="line 2 is not JSON"):
        read_log(log)


def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch():
    assert sorted(epoch_order(10, 3, 0).tolist()) == list(range(10))
    assert not torch.equal(epoch_order(10, 3, 0), epoch_order(10, 3, 1))
    assert torch.equal(epoch_order(10, 3, 1), epoch_order.__wrapped__(10, 3, 1))
