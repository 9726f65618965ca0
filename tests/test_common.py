"""common.py: atomic writes (all or nothing, no temporary files left behind, a normal file mode), the command
entry point's handling of signals, the pieces both trainers share (logs, resume lookup, run identity), argument
parsing (number ranges, one-line errors) and safe_torch_load."""
import argparse
import importlib
import os
import re
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import devices
from cli import UserError, at_least, non_negative_float, non_negative_int, positive_float, positive_int, run_cli
from checkpoints import (
    CorruptCheckpoint, atomic_write, atomic_write_json, check_run_identity, file_digest, load_resume, pickle_globals,
    read_json, safe_torch_load, save_state_dir,
)
from common import append_log, epoch_order, read_log, trim_log
from conftest import ROOT


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
    save_state_dir(tmp_path / "state", {"step": 1})
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o777 & ~umask  # not mkdtemp's private 0700


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
# Shared by trainer.py and vqgan.py


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


def write_checkpoints(folder, steps):
    for step in steps:
        save_state_dir(folder / f"step_{step:07d}", {"step": step, "weights": torch.full((3,), float(step))})


@pytest.mark.parametrize("damaged", ["tensors.safetensors", "state.json"])
def test_resume_auto_falls_back_past_a_truncated_newest_checkpoint(tmp_path, damaged):
    folder = tmp_path / "checkpoints"
    write_checkpoints(folder, [1, 2])
    data = (folder / "step_0000002" / damaged).read_bytes()
    (folder / "step_0000002" / damaged).write_bytes(data[:len(data) // 2])
    warnings = []
    path, state = load_resume("auto", folder, "choose another --out", warn=warnings.append)
    assert path == folder / "step_0000001" and state["step"] == 1 and torch.equal(state["weights"], torch.ones(3))
    assert len(warnings) == 1 and "step_0000002 is a corrupt or truncated checkpoint" in warnings[0]
    with pytest.raises(CorruptCheckpoint, match="corrupt or truncated"):  # named explicitly: one clear line
        load_resume(str(folder / "step_0000002"), folder, "choose another --out")
    (folder / "step_0000001" / "state.json").write_text("{")
    with pytest.raises(UserError, match="no intact checkpoint in .*: move the corrupt ones away"):
        load_resume("auto", folder, "choose another --out", warn=warnings.append)


def test_resume_lookup_fresh_runs_and_legacy_folders(tmp_path):
    folder = tmp_path / "checkpoints"
    assert load_resume(None, folder, "x") == (None, None) and load_resume("auto", folder, "x") == (None, None)
    legacy = tmp_path / "state"
    save_state_dir(legacy, {"step": 5})
    with pytest.raises(UserError, match="already holds checkpoints: pass --resume auto .* or choose another --out"):
        load_resume(None, folder, "choose another --out", legacy=[legacy])
    assert load_resume("auto", folder, "x", legacy=[legacy])[1]["step"] == 5
    write_checkpoints(folder, [7])
    assert load_resume("auto", folder, "x", legacy=[legacy])[1]["step"] == 7  # step folders are newer


def test_run_identity_mismatch_names_the_setting_and_unknown_is_allowed():
    saved = {"seed": 0, "prediction_type": "epsilon", "batch_size": 4}
    with pytest.raises(UserError, match=r"belongs to another run \(--prediction_type epsilon there, v here\)"):
        check_run_identity(saved, {**saved, "prediction_type": "v"}, "ckpt", "start a new --output_dir")
    check_run_identity(saved, dict(saved), "ckpt", "x")
    check_run_identity(None, {**saved, "seed": 1}, "ckpt", "x")  # a checkpoint from before identities
    check_run_identity(saved, {**saved, "grad_accum": 2}, "ckpt", "x")  # a setting it does not record


def test_epoch_order_and_file_digest(tmp_path):
    assert sorted(epoch_order(10, 3, 0).tolist()) == list(range(10))
    assert not torch.equal(epoch_order(10, 3, 0), epoch_order(10, 3, 1))
    assert torch.equal(epoch_order(10, 3, 1), epoch_order.__wrapped__(10, 3, 1))
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"abc")
    b.write_bytes(b"def")
    assert file_digest(a) == file_digest([a]) != file_digest([a, b])
    assert file_digest(str(a)) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # sha256("abc")


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


# ----------------------------------------------------------------------------------------------
# safe_torch_load: "not a checkpoint" and "needs unpickling" are different answers


class Payload:
    def __reduce__(self):
        return (print, ("the payload ran",))


def test_garbage_is_not_a_checkpoint_with_or_without_trust(tmp_path):
    """Random bytes, text, an empty file and a torn archive are no checkpoint: the answer must not push towards
    --trust_checkpoint, and the flag must not turn them into tracebacks."""
    torch.save({"w": torch.ones(3)}, tmp_path / "good.pt")
    whole = (tmp_path / "good.pt").read_bytes()
    files = {"random.ckpt": np.random.default_rng(0).bytes(4096), "text.ckpt": b"hello, not a checkpoint\n",
             "empty.ckpt": b"", "torn.ckpt": whole[:len(whole) // 2]}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        for trust in (False, True):
            with pytest.raises(UserError, match="is not a readable PyTorch checkpoint") as err:
                safe_torch_load(tmp_path / name, trust)
            assert "--trust_checkpoint" not in str(err.value) and "\n" not in str(err.value)
    assert torch.equal(safe_torch_load(tmp_path / "good.pt")["w"], torch.ones(3))


def test_a_pickle_that_runs_code_is_refused_naming_it_and_loads_only_when_trusted(tmp_path, capsys):
    torch.save({"w": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match=r"need arbitrary unpickling \(\S*print\).*--trust_checkpoint"):
        safe_torch_load(tmp_path / "evil.pt")
    assert "the payload ran" not in capsys.readouterr().out
    assert pickle_globals(tmp_path / "evil.pt")[0].endswith(".print")  # named first, before torch's own globals
    safe_torch_load(tmp_path / "evil.pt", trust=True)
    assert "the payload ran" in capsys.readouterr().out


@pytest.mark.parametrize("flags, speedup, expected", [
    (set(), 2.0, False),                    # no bf16 instructions: emulated, never chosen
    ({"avx512_bf16"}, 0.5, False),          # the flag, but measured slower than fp32 (seen on a 2-core Xeon)
    ({"avx512_bf16"}, 1.2, False),          # within the margin: fp32 stays
    ({"avx512_bf16"}, 2.0, True),
    ({"amx_bf16", "avx512_bf16"}, 3.0, True),
])
def test_cpu_bf16_is_chosen_only_where_the_flags_exist_and_it_measures_faster(monkeypatch, flags, speedup, expected):
    monkeypatch.setattr(devices, "cpu_flags", lambda: flags)
    monkeypatch.setattr(devices, "cpu_bf16_speedup", lambda: speedup)
    assert devices.native_bf16(torch.device("cpu")) is expected


def test_cpu_bf16_speedup_is_a_positive_ratio_measured_once_without_touching_the_global_rng_or_threads():
    devices.cpu_bf16_speedup.cache_clear()
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first = devices.cpu_bf16_speedup(size=64, repeats=1)
        assert torch.get_num_threads() == 2  # measured on one thread, the caller's count restored
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(torch.get_rng_state(), rng)  # a seeded training run draws the same numbers as without it
    assert first > 0 and devices.cpu_bf16_speedup(size=64, repeats=1) == first  # cached: one measurement a process
