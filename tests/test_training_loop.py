"""training_loop.py: the log a resumed run repairs, and the data order: a permutation per epoch, ranks sharded."""
import pytest
import torch

from cli import UserError
from training_loop import append_log, batch_rows, epoch_order, read_log, stream_position, trim_log


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


def test_data_order_is_a_permutation_per_epoch_and_shards_ranks():
    num_rows, world_size = 10, 2  # micro-batches of 3, 2 per step
    seen = torch.cat([batch_rows(num_rows, 3, 7, stream_position(step, micro, rank, world_size, 3, 2))
                      for step in range(5) for micro in range(2) for rank in range(world_size)])  # 60 samples
    for epoch in range(6):  # every epoch is a permutation, each a different one
        assert sorted(seen[epoch * 10:(epoch + 1) * 10].tolist()) == list(range(10))
    assert not torch.equal(seen[:10], seen[10:20])
    assert torch.equal(batch_rows(num_rows, 60, 7, 0), seen)  # a pure function of (seed, position)
    assert not torch.equal(batch_rows(num_rows, 60, 8, 0), seen)
