"""What every training loop shares besides its step (vqgan.py, trainer.py, prior.py): its log.jsonl and the
window one log line averages, when to log or save, stopping cleanly on a signal, the order of the data, the
learning-rate and EMA schedules, and the random state a checkpoint records.
"""
import contextlib
import functools
import json
import math
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch

from checkpoints import atomic_write
from cli import UserError, interrupt


# ----------------------------------------------------------------------------------------------
# Training logs: one JSON object per line (log.jsonl), appended and flushed line by line. A run killed mid-write
# leaves a torn last line, which readers drop.


def append_log(log_path, entry):
    """Append `entry` (a JSON-able dict) as one line and flush it, so a kill loses at most this line."""
    with open(log_path, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()


def read_log(log_path):
    """The entries of a log.jsonl; a torn (unparsable) last line is dropped, a bad earlier line is a UserError."""
    lines = [line for line in Path(log_path).read_text(errors="replace").splitlines() if line.strip()]
    entries = []
    for number, line in enumerate(lines, 1):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise UserError(f"{log_path} line {number} is not JSON: repair or delete the log") from None
    return entries


def trim_log(log_path, last_step):
    """Drop log lines after the step a resumed run restarts from (and a torn last line)."""
    if not Path(log_path).is_file():
        return
    kept = [entry for entry in read_log(log_path) if entry["step"] <= last_step]
    atomic_write(log_path, lambda f: f.write("".join(json.dumps(entry) + "\n" for entry in kept)), mode="w")


# A run's log at its start, the window of one log line, when to log or save, and stopping cleanly on a signal.


def start_log(log_path, resumed_step):
    """A run's log.jsonl at its start: trimmed to `resumed_step` on resume (trim_log), removed for a fresh run (0)."""
    if resumed_step:
        trim_log(log_path, resumed_step)
    else:
        Path(log_path).unlink(missing_ok=True)


class LogWindow:
    """What one log line averages: the metrics of the steps since the last line (each over the steps that reported
    it), and steps/s over training time alone (`paused()` leaves checkpoints and previews out)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.sums, self.counts, self.steps, self.start = {}, {}, 0, time.perf_counter()

    def add(self, metrics):
        """One training step's metrics (name -> float; a None value is not counted)."""
        for name, value in metrics.items():
            if value is not None:
                self.sums[name] = self.sums.get(name, 0.0) + value
                self.counts[name] = self.counts.get(name, 0) + 1
        self.steps += 1

    def means(self):
        return {name: total / self.counts[name] for name, total in self.sums.items()}

    def steps_per_s(self):
        return self.steps / (time.perf_counter() - self.start)

    @contextlib.contextmanager
    def paused(self):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - started


def due(step, every, last_step, stopping=False):
    """Whether step `step` logs or saves: every `every` steps, at the last step, and when a signal stops the run."""
    return step % every == 0 or step == last_step or stopping


class StopSignal:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the end of the current step and exits. A second
    signal gives up at once (atomic writes keep the last checkpoint whole)."""

    def __init__(self):
        self.name = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.name is not None:
            interrupt(signum, frame)
        self.name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# ----------------------------------------------------------------------------------------------
# Data order: the run is one stream of samples, a fresh permutation of the data each epoch, a pure function of
# (seed, epoch). Micro-batch m of optimizer step s on rank r starts at a fixed position, so a resumed run (or one
# with another number of steps between checkpoints) sees exactly the samples a straight run would.


@functools.lru_cache(maxsize=4)
def epoch_order(num_items, seed, epoch):
    """The order of the data in `epoch`: a permutation of range(num_items), a pure function of (seed, epoch)."""
    return torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def stream_position(step, micro, rank, world_size, batch_size, grad_accum):
    """Index in the sample stream of the first sample of micro-batch `micro` of optimizer step `step` on `rank`
    (`batch_size` samples per micro-batch, `grad_accum` micro-batches per step on each of `world_size` ranks)."""
    return ((step * grad_accum + micro) * world_size + rank) * batch_size


def batch_rows(num_rows, batch_size, seed, position):
    """Cache rows of the `batch_size` samples from `position` on in the sample stream."""
    positions = torch.arange(position, position + batch_size)
    epochs, offsets = positions // num_rows, positions % num_rows
    rows = torch.empty(batch_size, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        here = epochs == epoch
        rows[here] = epoch_order(num_rows, seed, epoch)[offsets[here]]
    return rows


# ----------------------------------------------------------------------------------------------
# The learning rate and the EMA: their schedules, and the EMA's update


def lr_factor(step, warmup_steps, max_steps, lr_schedule="constant", floor=0.0):
    """Multiplier of the peak learning rate at optimizer step `step` (from 0): linear warm-up (step + 1) / warmup
    over `warmup_steps`, then 1 ("constant"), or ("cosine") a half cosine from 1 down to `floor` (= min_lr / lr)
    at `max_steps`: floor + (1 - floor) * (1 + cos(pi * progress)) / 2."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def ema_decay(step, max_decay, warm_start=False):
    """EMA decay at optimizer step `step` (from 0) of a run. A fresh run warms up, min(max_decay, (1 + step) /
    (10 + step)), so the early average forgets the random initialisation quickly. A run started from a trained
    model (`warm_start`, --init_from) averages at `max_decay` from its first step: its EMA starts as that model's
    own and stays an average over about 1 / (1 - max_decay) steps, the decay its config states."""
    return max_decay if warm_start else min(max_decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, for every parameter and buffer."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
    for ema_buffer, buffer in zip(ema.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)


# ----------------------------------------------------------------------------------------------
# Random state: what a checkpoint records, so a resumed run draws the same numbers as a straight one


def rng_state():
    """All random-number-generator states a training step can touch."""
    state = {"python": random.getstate(), "numpy": _numpy_rng_to_plain(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(_to_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_rng_to_plain():
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return (kind, keys.tolist(), int(pos), int(has_gauss), float(cached))


def _to_tuples(obj):
    return tuple(_to_tuples(v) for v in obj) if isinstance(obj, (list, tuple)) else obj


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
