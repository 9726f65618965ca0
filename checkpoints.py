"""Checkpoints and the files under them, written whole and read without pickle: atomic writes, model files
(NAME.safetensors + NAME.json), checkpoints from elsewhere (.ckpt/.pt, safe_torch_load), training-state folders for
exact resume, and a run's step checkpoints with the resume lookup and run identity.
"""
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from cli import UserError, require_file


# ----------------------------------------------------------------------------------------------
# Atomic writes: write a temporary file in the same folder, fsync, then rename over the target.


_UMASK = os.umask(0)  # read once (os.umask can only be read by setting it)
os.umask(_UMASK)


def atomic_write(path, write_fn, mode="wb"):
    """Call `write_fn(file)` on a temporary file next to `path`, then rename it into place.
    A crash leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes the file private (0600); give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path, data):
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path, obj):
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, sort_keys=True), mode="w")


def read_json(path, what="JSON file"):
    path = require_file(path, what)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{what} {path} is not valid JSON: {err}") from None


def file_digest(paths):
    """sha256 hex digest of the bytes of `paths` (one path or several, in order)."""
    digest = hashlib.sha256()
    for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Model files: `NAME.safetensors` (weights) + `NAME.json` (config). No pickle anywhere.


def model_paths(path):
    """Map any of `NAME`, `NAME.safetensors` or `NAME.json` to (weights_path, config_path)."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_suffix(".safetensors"), path.with_suffix(".json")


EXPORT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}  # --export_dtype -> storage


def save_model(path, tensors, config, dtype=None):
    """Write `tensors` (name -> tensor) and `config` (JSON-able dict) atomically.
    `dtype` (e.g. torch.float16) casts floating-point tensors for storage."""
    from safetensors.torch import save

    weights_path, config_path = model_paths(path)
    tensors = {
        name: (t.to(dtype) if dtype is not None and t.is_floating_point() else t).detach().cpu().contiguous()
        for name, t in tensors.items()
    }
    atomic_write_bytes(weights_path, save(tensors))
    atomic_write_json(config_path, config)
    return weights_path


def load_model(path, what="model checkpoint"):
    """Read a model written by `save_model`: returns (tensors, config). Never unpickles."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights_path, config_path = model_paths(path)
    require_file(weights_path, f"{what} weights")
    config = read_json(config_path, f"{what} config")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as err:
        raise UserError(f"{what} {weights_path} is not a readable safetensors file: {err}") from None
    return tensors, config


def read_checkpoint_tensors(path, trust=False):
    """Name -> tensor from one of our safetensors models, or a `.ckpt`/`.pt`/`.pth` file (a plain state dict or
    a Lightning `{"state_dict": ...}`), read without unpickling code unless `trust`."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json") or (path.suffix == "" and model_paths(path)[0].is_file()):
        return load_model(path, "checkpoint")[0]
    checkpoint = safe_torch_load(path, trust)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    tensors = {}
    if isinstance(checkpoint, dict):
        tensors = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(f"{path} holds no tensors")
    return tensors


def safe_torch_load(path, trust=False):
    """Load a `.ckpt`/`.pt` file with `torch.load(weights_only=True)`. A file that needs arbitrary unpickling (and
    could run code) is refused unless `trust` is set. A file that holds no PyTorch checkpoint at all is a UserError
    either way: it is told apart by reading its pickle without running it, and never reaches the unsafe loader."""
    import pickle

    path = require_file(path, "checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # objects the safe loader does not allow, or bytes that are no pickle: told apart below
    except Exception as err:  # a torn archive (RuntimeError), an empty file (EOFError), text (KeyError), ...
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({_first_line(err)})") from None
    names = pickle_globals(path)
    if names is None:
        raise UserError(f"{path} is not a readable PyTorch checkpoint (no well-formed pickle in it)")
    if not trust:
        raise UserError(f"{path} holds objects that need arbitrary unpickling ({', '.join(names[:3]) or 'unknown'}); "
                        "refusing to load it. Pass --trust_checkpoint only if you trust its source.")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # e.g. a class from a package that is not installed
        raise UserError(f"{path} cannot be unpickled even with --trust_checkpoint: {_first_line(err)}") from None


def pickle_globals(path):
    """The `module.name` globals the pickle of a PyTorch file names (read by pickletools, never run), those outside
    torch and collections first; None if the file (or its zip archive's data.pkl) holds no well-formed pickle."""
    import io
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                data = archive.read(next(n for n in archive.namelist() if Path(n).name == "data.pkl"))
        else:
            data = Path(path).read_bytes()
        ops = list(pickletools.genops(io.BytesIO(data)))  # raises at the first byte that is no opcode
    except Exception:  # not a pickle, a torn archive, an archive without data.pkl: no checkpoint
        return None
    if ops[0][0].name != "PROTO":  # torch.save always writes a protocol header
        return None
    names, strings = [], []
    for opcode, arg, _ in ops:
        if opcode.name == "GLOBAL":
            names.append(arg.replace(" ", "."))
        elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
            names.append(".".join(strings[-2:]))
        if isinstance(arg, str):
            strings.append(arg)
    return sorted(dict.fromkeys(names), key=lambda name: name.split(".")[0] in ("torch", "collections"))


def _first_line(err):
    """`Type: first sentence` of an exception, for one-line messages."""
    text = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def load_weights(module, tensors, what, allow_missing=False):
    """Strict load; a mismatch is a UserError naming the first missing, unexpected or misshapen keys.
    `allow_missing` lets the module keep its own values where `tensors` has none (returns their names)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    misshapen = [f"{k} {tuple(tensors[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
                 if k in tensors and tensors[k].shape != v.shape]
    problems = [f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                for label, keys in (("missing", [] if allow_missing else missing), ("unexpected", unexpected),
                                    ("wrong shape", misshapen)) if keys]
    if problems:
        raise UserError(f"{what} does not match the model ({'; '.join(problems)})")
    module.load_state_dict(tensors, strict=not allow_missing)
    return missing


# ----------------------------------------------------------------------------------------------
# Training state (for exact resume): a folder with `tensors.safetensors` + `state.json`.
# Nested dicts/lists of tensors and plain values are split into flat tensors and a JSON skeleton,
# so optimizer states and RNG states round-trip exactly without pickle.


def _flatten(obj, tensors):
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_flatten(k, tensors), _flatten(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_flatten(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a training state")


def _unflatten(obj, tensors):
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
    return obj


def save_state_dir(path, state):
    """Atomically write nested `state` (dicts, lists, tuples, tensors, plain values) to folder
    `path`: a temporary folder is filled and renamed, so `path` is always whole."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes the folder private (0700); give it a normal folder's mode
    try:
        tensors = {}
        skeleton = _flatten(state, tensors)
        save_file(tensors, str(tmp / "tensors.safetensors"))
        (tmp / "state.json").write_text(json.dumps(skeleton))
        for name in ("tensors.safetensors", "state.json"):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class CorruptCheckpoint(UserError):
    """A training-state folder that is torn, truncated or otherwise unreadable."""


def load_state_dir(path):
    """Read a folder written by `save_state_dir`. A folder without state.json is a UserError; one whose files are
    missing, truncated or corrupt is a CorruptCheckpoint (resume falls back to an older one)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "state.json").is_file() and not (path / "tensors.safetensors").is_file():
        raise UserError(f"{path} is not a training checkpoint (expected state.json and tensors.safetensors)")
    try:
        tensors = load_file(str(path / "tensors.safetensors"))
        return _unflatten(json.loads((path / "state.json").read_text()), tensors)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
        raise CorruptCheckpoint(f"{path} is a corrupt or truncated checkpoint ({type(err).__name__}: "
                                f"{str(err).splitlines()[0] if str(err) else 'unreadable'})") from None


# ----------------------------------------------------------------------------------------------
# Step checkpoints: what a training run resumes from. They are save_state_dir folders FOLDER/step_NNNNNNN (a new
# step never replaces the folder of another, so there is always a whole checkpoint on disk).


def checkpoint_path(folder, step):
    return Path(folder) / f"step_{step:07d}"


def list_checkpoints(folder):
    """Checkpoint folders in `folder`, oldest first."""
    found = [p for p in Path(folder).glob("step_*") if re.fullmatch(r"step_\d+", p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def prune_checkpoints(folder, keep_last):
    """Delete all but the newest `keep_last` checkpoints in `folder`."""
    for old in list_checkpoints(folder)[:-keep_last]:
        shutil.rmtree(old)


def load_resume(resume, folder, new_run_hint, legacy=(), warn=print):
    """(checkpoint folder, its state) to continue from, or (None, None) for a fresh run.
    resume None: a fresh run, refused when `folder` (or a `legacy` folder) already holds checkpoints;
    "auto": the newest intact checkpoint (legacy folders count as the oldest), falling back past a corrupt one with
    a warning; else the folder named. `new_run_hint` ends the refusal, e.g. "choose another --output_dir"."""
    existing = [p for p in legacy if Path(p).is_dir()] + list_checkpoints(folder)
    if resume is None:
        if existing:
            raise UserError(f"{existing[-1].parent} already holds checkpoints: pass --resume auto to continue them, "
                            f"or {new_run_hint}")
        return None, None
    if resume != "auto":
        if not Path(resume).is_dir():
            raise UserError(f"--resume {resume}: no such checkpoint folder")
        return Path(resume), load_state_dir(resume)
    for path in reversed(existing):
        try:
            return path, load_state_dir(path)
        except CorruptCheckpoint as err:
            warn(f"warning: {err}; trying the previous checkpoint")
    if existing:
        raise UserError(f"no intact checkpoint in {folder} to resume: move the corrupt ones away, or {new_run_hint}")
    return None, None


def check_run_identity(saved, current, path, new_run_hint):
    """Refuse to continue checkpoint `path`, saved with run identity `saved` (setting name -> value), under another
    identity `current`. A setting the checkpoint does not record (an older checkpoint) is taken as unchanged."""
    differing = [f"--{name} {saved[name]} there, {current[name]} here" for name in current
                 if name in (saved or {}) and saved[name] != current[name]]
    if differing:
        raise UserError(f"{path} belongs to another run ({'; '.join(differing)}): pass the same settings to "
                        f"resume it, or {new_run_hint}")
