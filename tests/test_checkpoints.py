"""checkpoints.py: atomic writes (all or nothing, no temporary files left behind, a normal file mode), file
digests, the resume lookup and run identity of step checkpoints, and safe_torch_load."""
import os
import stat

import numpy as np
import pytest
import torch

from checkpoints import (
    CorruptCheckpoint, atomic_write, atomic_write_json, check_run_identity, file_digest, load_resume, pickle_globals,
    read_json, safe_torch_load, save_state_dir,
)
from cli import UserError


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


def test_file_digest_of_one_file_or_several(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"abc")
    b.write_bytes(b"def")
    assert file_digest(a) == file_digest([a]) != file_digest([a, b])
    assert file_digest(str(a)) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # sha256("abc")


# ----------------------------------------------------------------------------------------------
# Step checkpoints: what trainer.py, vqgan.py and prior.py resume from


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
