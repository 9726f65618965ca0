"""Shared helpers for the Noise2Art scripts: errors, atomic file writes, checkpoint I/O,
image datasets, devices and PNG output.

Everything that more than one script needs lives here, once.
"""
import contextlib
import functools
import hashlib
import json
import os
import random
import re
import shutil
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from cli import UserError, interrupt, require_file

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
GRID_NAME = "grid-{:05d}.png"  # diffusion.py's mosaics, next to the images they tile: never read as samples


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


# The chores both training loops share: the log at the start, a log line's window, when to log or save.


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


# ----------------------------------------------------------------------------------------------
# Training runs: what trainer.py and vqgan.py share. Checkpoints are save_state_dir folders FOLDER/step_NNNNNNN
# (a new step never replaces the folder of another, so there is always a whole checkpoint on disk).


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


@functools.lru_cache(maxsize=4)
def epoch_order(num_items, seed, epoch):
    """The order of the data in `epoch`: a permutation of range(num_items), a pure function of (seed, epoch)."""
    return torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


# ----------------------------------------------------------------------------------------------
# Image sources: an ImageFolder (as written by download_hf.py), a plain folder of images,
# or a dataset that `datasets.load_dataset` can read (local folder, parquet files, hub name).


class ImageSource:
    """Random access to (PIL image or None, metadata dict) pairs.
    `None` means the image could not be read; callers skip and count it. A plain folder is read recursively,
    leaving out the grids diffusion.py writes next to its images (is_grid), so a sample folder holds its N images."""

    def __init__(self, path, split="train", image_column="image"):
        self.path, self.split, self.image_column = str(path), split, image_column
        folder = Path(path)
        self._records = None
        self._dataset = None
        if folder.is_dir() and (folder / "metadata.jsonl").is_file():
            self._records = _read_metadata_jsonl(folder)
        elif folder.is_dir() and not _looks_like_hf_dataset(folder):
            self._records = [
                {"file_name": str(p.relative_to(folder))}
                for p in sorted(folder.rglob("*"))
                if p.suffix.lower() in IMAGE_EXTENSIONS and not is_grid(p)
            ]
        else:
            self._dataset = load_hf_dataset(path, split)
            if image_column not in self._dataset.column_names:
                raise UserError(
                    f"dataset {path} has no column {image_column!r} (columns: {', '.join(self._dataset.column_names)})"
                )
            self._image_column = image_column
            from datasets import Image as ImageFeature

            self._dataset = self._dataset.cast_column(image_column, ImageFeature(decode=False))
            self._class_names = class_label_names(self._dataset.features)
        self.folder = folder
        if len(self) == 0:
            raise UserError(f"no images found in {path}")

    def __len__(self):
        return len(self._records) if self._records is not None else len(self._dataset)

    @property
    def columns(self):
        if self._records is not None:
            return sorted({k for r in self._records for k in r} - {"file_name"})
        return [c for c in self._dataset.column_names if c != self._image_column]

    def metadata(self, index):
        """Metadata of row `index` (ClassLabel values as names), without decoding the image."""
        if self._records is not None:
            return {k: v for k, v in self._records[index].items() if k != "file_name"}
        row = self._dataset.select_columns(self.columns)[index]
        return {k: self._class_names[k][v] if k in self._class_names and v is not None else v for k, v in row.items()}

    def column_values(self, column):
        """Every row's value of metadata `column` (ClassLabel values as names; None where a row lacks it)."""
        if column not in self.columns:
            raise UserError(f"{self.path} has no metadata column {column!r} (columns: {', '.join(self.columns)})")
        if self._records is not None:
            return [record.get(column) for record in self._records]
        names = self._class_names.get(column)
        return [names[v] if names and v is not None else v for v in self._dataset[column]]

    def image(self, index):
        """The RGB image of row `index`, or None if it cannot be decoded."""
        try:
            if self._records is not None:
                return _open_rgb(self.folder / self._records[index]["file_name"])
            value = self._dataset[index][self._image_column]
            if value.get("bytes") is not None:
                import io

                return _open_rgb(io.BytesIO(value["bytes"]))
            return _open_rgb(value["path"])
        except (OSError, ValueError, Image.DecompressionBombError):
            return None


def is_grid(path):
    """Whether `path` is named as diffusion.py names its grids (GRID_NAME): a mosaic of images, not an image."""
    return re.fullmatch(GRID_NAME.replace("{:05d}", r"\d{5,}").replace(".", r"\."), Path(path).name) is not None


def _open_rgb(file):
    with Image.open(file) as img:
        img.load()
        return img.convert("RGB")


def _read_metadata_jsonl(folder):
    records = []
    with open(folder / "metadata.jsonl") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{folder / 'metadata.jsonl'} line {line_no} is not valid JSON") from None
            if "file_name" not in record:
                raise UserError(f"{folder / 'metadata.jsonl'} line {line_no} has no file_name")
            records.append(record)
    return records


def _looks_like_hf_dataset(folder):
    """A folder `datasets.load_dataset` should read: parquet/arrow files, a data/ folder or a
    dataset script/README, rather than loose images."""
    return any(folder.glob("*.parquet")) or any(folder.glob("*.arrow")) or (folder / "data").is_dir() or (
        folder / "dataset_info.json"
    ).is_file()


def load_hf_dataset(path, split, streaming=False):
    """`datasets.load_dataset(path, split=split)` for a hub name, a local folder or parquet file(s)
    (a path ending in .parquet, globs allowed), with one-line errors for the usual mistakes."""
    import datasets

    try:
        if not streaming and Path(path).is_dir() and (Path(path) / "dataset_info.json").is_file():
            return datasets.load_from_disk(str(path))
        if str(path).endswith(".parquet"):
            return datasets.load_dataset("parquet", data_files=str(path), split=split, streaming=streaming)
        return datasets.load_dataset(str(path), split=split, streaming=streaming)
    except ValueError as err:
        if "split" in str(err).lower():
            raise UserError(f"dataset {path} has no split {split!r} ({err})") from None
        raise UserError(f"cannot load dataset {path}: {err}") from None
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as err:
        raise UserError(f"dataset not found: {path} ({str(err).splitlines()[0] if str(err) else ''})") from None
    except ConnectionError as err:
        raise UserError(f"cannot reach the Hugging Face hub for {path}: {err}") from None


def class_label_names(features):
    from datasets import ClassLabel

    return {name: feature.names for name, feature in features.items() if isinstance(feature, ClassLabel)}


class ImageTensorDataset(torch.utils.data.Dataset):
    """An ImageSource as tensors in [-1, 1], 3xRxR: shorter side resized to `resolution`, then a
    random (training) or centre crop, and an optional random horizontal flip.
    Unreadable images give None; `collate_skip_none` drops them from the batch."""

    def __init__(self, source, resolution, random_crop=True, flip=True):
        self.source = source
        self.resolution = resolution
        self.random_crop = random_crop
        self.flip = flip

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        img = self.source.image(index)
        if img is None:
            return None
        return image_to_tensor(img, self.resolution, self.random_crop, self.flip and random.random() < 0.5)


class IndexedImages(torch.utils.data.Dataset):
    """(row, centre-cropped image 3 x R x R) for chosen rows of an ImageSource; None where unreadable."""

    def __init__(self, source, rows, resolution):
        self.images = ImageTensorDataset(source, resolution, random_crop=False, flip=False)
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        image = self.images[self.rows[i]]
        return None if image is None else (self.rows[i], image)


def image_to_tensor(img, resolution, random_crop=False, flip=False):
    """PIL image -> float tensor 3xRxR in [-1, 1] (resize shorter side, crop, optional flip)."""
    w, h = img.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    img = img.resize((new_w, new_h), Image.BICUBIC)
    if random_crop:
        left, top = random.randint(0, new_w - resolution), random.randint(0, new_h - resolution)
    else:
        left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0  # R x R x 3
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def collate_skip_none(batch):
    """Collate a batch, dropping items that are None (unreadable images). May return None."""
    batch = [item for item in batch if item is not None]
    return torch.utils.data.default_collate(batch) if batch else None


# ----------------------------------------------------------------------------------------------
# Images out


def tensor_to_images(images):
    """Float tensor Bx3xHxW in [-1, 1] -> list of PIL images."""
    array = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in array]


def make_grid(images, ncols=None):
    """Tile equally sized PIL images into one image (ncols defaults to a near-square grid)."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    ncols = ncols or int(np.ceil(np.sqrt(len(images))))
    nrows = int(np.ceil(len(images) / ncols))
    w, h = images[0].size
    grid = Image.new("RGB", (ncols * w, nrows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % ncols) * w, (i // ncols) * h))
    return grid


def save_png(path, img, text=None):
    """Save a PIL image as PNG atomically, with `text` (str -> str or JSON-able) as PNG tEXt chunks."""
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    atomic_write(path, lambda f: img.save(f, format="PNG", pnginfo=info))


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
