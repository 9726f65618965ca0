"""Images in and out: where paintings are read from (an ImageFolder, a plain folder or a `datasets` dataset:
ImageSource), the tensors training and evaluation take (ImageTensorDataset, IndexedImages, image_to_tensor), and
what is written back (tensor_to_images, make_grid, save_png with PNG text chunks).
"""
import json
import random
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from checkpoints import atomic_write
from cli import UserError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
GRID_NAME = "grid-{:05d}.png"  # diffusion.py's mosaics, next to the images they tile: never read as samples


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
