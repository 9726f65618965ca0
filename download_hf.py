"""Download an image dataset into an ImageFolder for training: one image file per row, named by
its row index (00000042.jpg), plus metadata.jsonl with `file_name` and the chosen metadata columns.
`datasets.load_dataset("imagefolder", data_dir=OUTPUT_DIR)` and images.ImageSource read it back.

    python download_hf.py --dataset_name huggan/wikiart --image_bytes_key image \\
        --metadata_columns artist genre style --rows 1000 --output_dir wikiart_images --workers 8
    python download_hf.py --dataset_name laion/laion-art --url_key URL --metadata_columns TEXT WIDTH HEIGHT \\
        similarity LANGUAGE hash pwatermark punsafe aesthetic --rows 1000 --output_dir laion_art_images --workers 8

Rows are streamed, so --rows N reads only the first N rows of the split. Images come from a column of
image bytes (--image_bytes_key) or are downloaded from a column of URLs (--url_key) by --workers
threads, with a timeout, retries with exponential backoff (connection errors, timeouts, HTTP 5xx and
429; other 4xx are final), a size cap and a check that the bytes decode as an image. ClassLabel
columns are written as their names. Images are saved as RGB JPEG, quality 95 with full-resolution
colour (4:4:4): close to lossless for paintings at a fraction of PNG's size (--image_format png for
exactly lossless files, --jpeg_quality for smaller ones). --max_side downsizes keeping the aspect;
--center_crop N saves N x N squares instead (the shorter side resized to N, the centre cropped).

Resumable: re-running the same command skips rows already saved. An image is written atomically
before its metadata line is appended (flushed and fsynced), so a crash or Ctrl-C loses at most the
rows in flight, and a torn last line or a line whose image is missing is repaired on the next run.
Failed rows are tried again on the next run. The closing line on stdout counts the rows:

    saved 5, skipped 3 (already present), failed 2 (filtered punsafe: 1, http 404: 1); OUT holds 8 images

Failure reasons: http STATUS, timeout, connection error, bad url, no url, no image, too large,
not an image, filtered min_side, filtered pwatermark, filtered punsafe, filtered aesthetic.
"""
import argparse
import functools
import io
import itertools
import json
import math
import operator
import os
import sys
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import datasets
import huggingface_hub
import requests
from PIL import Image, ImageOps
from tqdm import tqdm

from checkpoints import atomic_write
from cli import (
    ArgumentParser, UserError, check_output_folder, non_negative_float, non_negative_int, positive_float, positive_int,
    run_cli,
)
from images import class_label_names, load_hf_dataset

METADATA = "metadata.jsonl"
SAVE_OPTIONS = {"jpg": {"format": "JPEG", "quality": 95, "subsampling": 0}, "png": {"format": "PNG"}}
USER_AGENT = "noise2art-download_hf/1.0"


def parse_args(argv):
    parser = ArgumentParser(__file__, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_name", required=True,
                        help="Hugging Face dataset name (huggan/wikiart), local dataset folder, or parquet "
                             "file(s) (a glob such as 'data/*.parquet' works)")
    parser.add_argument("--split", default="train", help="split to read (default: train)")
    parser.add_argument("--image_bytes_key", help="column holding the images (datasets Image, raw bytes or PIL images)")
    parser.add_argument("--url_key", help="column holding image URLs to download")
    parser.add_argument("--metadata_columns", nargs="*", default=[],
                        help="columns written to metadata.jsonl next to file_name (ClassLabel values as names)")
    parser.add_argument("--rows", type=int, default=None,
                        help="read only the first ROWS rows of the split (default, or -1: all rows)")
    parser.add_argument("--output_dir", default="images", help="ImageFolder to write (created; default: images)")
    parser.add_argument("--workers", type=positive_int, default=4,
                        help="threads that download, decode and save images (default: 4)")
    parser.add_argument("--timeout", type=positive_float, default=20.0,
                        help="seconds allowed for one HTTP request, connect to last byte (default: 20)")
    parser.add_argument("--retries", type=non_negative_int, default=3,
                        help="extra attempts after a connection error, timeout, HTTP 5xx or 429 (default: 3)")
    parser.add_argument("--backoff", type=non_negative_float, default=1.0,
                        help="seconds before the first retry, doubling each time (default: 1)")
    parser.add_argument("--max_bytes", type=positive_int, default=20_000_000,
                        help="skip images larger than this many bytes (default: 20000000)")
    parser.add_argument("--min_side", type=positive_int, default=None,
                        help="skip images whose shorter side is below this many pixels (checked from WIDTH/HEIGHT "
                             "columns before downloading where the dataset has them, and on the decoded image)")
    parser.add_argument("--max_pwatermark", type=float, default=None,
                        help="skip rows whose pwatermark column (watermark probability) is above this or missing")
    parser.add_argument("--max_punsafe", type=float, default=None,
                        help="skip rows whose punsafe column (NSFW probability) is above this or missing")
    parser.add_argument("--min_aesthetic", type=float, default=None,
                        help="skip rows whose aesthetic column (aesthetic score) is below this or missing")
    parser.add_argument("--max_side", type=positive_int, default=None,
                        help="downsize images whose longer side exceeds this many pixels, keeping the aspect "
                             "(default: keep the size)")
    parser.add_argument("--center_crop", type=positive_int, default=None, metavar="N",
                        help="save N x N squares: resize (Lanczos) so the shorter side is N, then crop the centre; "
                             "smaller images are upscaled unless --min_side filters them (not with --max_side)")
    parser.add_argument("--image_format", choices=sorted(SAVE_OPTIONS), default="jpg",
                        help="jpg: JPEG quality 95 with 4:4:4 colour, small and visually lossless (default); "
                             "png: exactly lossless, several times larger")
    parser.add_argument("--jpeg_quality", type=int, default=None, metavar="Q",
                        help="JPEG quality 1..100 (default: 95); 4:4:4 colour at 90 and above, the standard 4:2:0 "
                             "below 90 (smaller files); jpg only, an error with --image_format png")
    return parser.parse_args(argv)


def check_args(args):
    if (args.image_bytes_key is None) == (args.url_key is None):
        raise UserError("give exactly one of --image_bytes_key (images in the dataset) or --url_key (image URLs)")
    if args.rows is not None and args.rows != -1 and args.rows < 1:
        raise UserError(f"--rows must be a positive number of rows (or -1 for all), got {args.rows}")
    if args.center_crop and args.max_side:
        raise UserError("give --center_crop (square images) or --max_side (keep the aspect), not both")
    if args.jpeg_quality is not None and not 1 <= args.jpeg_quality <= 100:
        raise UserError(f"--jpeg_quality must be 1..100, got {args.jpeg_quality}")
    if args.jpeg_quality is not None and args.image_format != "jpg":
        raise UserError("--jpeg_quality applies to JPEG only: drop it or use --image_format jpg")
    if args.image_bytes_key is not None and args.image_bytes_key in args.metadata_columns:
        raise UserError(f"--metadata_columns cannot include the image column {args.image_bytes_key!r}")


# ----------------------------------------------------------------------------------------------
# Dataset: a stream of rows, checked against the requested columns


def open_stream(name, split):
    """`datasets.load_dataset(..., streaming=True)` for a hub name, a local folder or parquet file(s)."""
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    huggingface_hub.logging.set_verbosity_error()  # "Repo card metadata block was not found" on local folders
    return load_hf_dataset(name, split, streaming=True)


def find_column(columns, name):
    """`name` if it is a column, else a column equal to it ignoring case (LAION: WIDTH, punsafe), else None."""
    matches = [c for c in columns if c == name] or [c for c in columns if c.lower() == name.lower()]
    return matches[0] if matches else None


SCORE_FLAGS = [("max_pwatermark", "pwatermark", operator.le), ("max_punsafe", "punsafe", operator.le),
               ("min_aesthetic", "aesthetic", operator.ge)]  # flag, score column, how a row passes


def score_filters(limits, columns):
    """(reason, column, limit, passes) for each --max_*/--min_* score flag that is set (`limits`: flag -> value or
    None, for the flags of SCORE_FLAGS)."""
    filters = []
    for flag, name, passes in SCORE_FLAGS:
        limit = limits.get(flag)
        if limit is None:
            continue
        column = find_column(columns, name)
        if column is None:
            raise UserError(f"--{flag} needs a {name!r} column (columns: {', '.join(columns)})")
        filters.append((f"filtered {name}", column, limit, passes))
    return filters


def prefilter_reason(row, filters, size_columns, min_side):
    """Why a row is skipped before its image is fetched, or None. Missing scores fail the filter."""
    for reason, column, limit, passes in filters:
        value = row[column]
        if value is None or not passes(value, limit):  # NaN fails every comparison too
            return reason
    if min_side and size_columns:
        width, height = row[size_columns[0]], row[size_columns[1]]
        if width is not None and height is not None and min(width, height) < min_side:
            return "filtered min_side"
    return None


def json_value(value, class_names=None):
    """A metadata cell as JSON: ClassLabel ids become names, NaN becomes null."""
    if class_names is not None:
        return class_names[value] if value is not None and 0 <= value < len(class_names) else None
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


# ----------------------------------------------------------------------------------------------
# One row's image: fetch or take the bytes, decode, check, save. Runs in worker threads.


class RowFailed(Exception):
    """A row that gives no image; `reason` is what the summary counts ("http 404", "timeout", ...)."""

    def __init__(self, reason, retry=False):
        super().__init__(reason)
        self.reason = reason
        self.retry = retry


_thread_state = threading.local()


def http_session():
    if not hasattr(_thread_state, "session"):
        _thread_state.session = requests.Session()
        _thread_state.session.headers["User-Agent"] = USER_AGENT
    return _thread_state.session


def download_once(url, timeout, max_bytes):
    deadline = time.monotonic() + timeout
    try:
        with http_session().get(url, timeout=timeout, stream=True) as response:
            if response.status_code != 200:
                status = response.status_code
                raise RowFailed(f"http {status}", retry=status >= 500 or status == 429)
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise RowFailed("too large")
            data = bytearray()
            for chunk in response.iter_content(64 * 1024):
                data += chunk
                if len(data) > max_bytes:
                    raise RowFailed("too large")
                if time.monotonic() > deadline:
                    raise RowFailed("timeout", retry=True)
            return bytes(data)
    except requests.Timeout:
        raise RowFailed("timeout", retry=True) from None
    except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema):
        raise RowFailed("bad url") from None
    except requests.RequestException:  # connection refused or reset, broken chunked body, ...
        raise RowFailed("connection error", retry=True) from None


def download(url, timeout, max_bytes, retries=0, backoff=1.0):
    """The bytes at `url` (at most `max_bytes`, within `timeout` seconds), retrying transient failures `retries`
    times with exponential backoff from `backoff` seconds."""
    if not isinstance(url, str) or not url:
        raise RowFailed("no url")
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            return download_once(url, timeout, max_bytes)
        except RowFailed as failure:
            if not failure.retry or attempt == retries:
                raise


def stored_image(value):
    """Bytes or a PIL image from an image cell: a datasets Image dict (bytes/path), raw bytes or a PIL image."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"]
        try:
            return Path(value["path"]).read_bytes()
        except (KeyError, TypeError, OSError):
            raise RowFailed("no image") from None
    if isinstance(value, (bytes, bytearray, Image.Image)):
        return value
    raise RowFailed("no image")


def decode_rgb(data):
    """Decode fully (verifies the bytes are an image), apply EXIF rotation, flatten alpha onto white."""
    try:
        img = data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data))
        img.load()
        img = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError:
        raise RowFailed("too large") from None
    except (OSError, ValueError, SyntaxError):
        raise RowFailed("not an image") from None
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.new("RGB", rgba.size, "white")
        img.paste(rgba, mask=rgba.getchannel("A"))
    return img.convert("RGB")


def save_options(image_format, jpeg_quality=None):
    """PIL save() keywords: SAVE_OPTIONS, with `jpeg_quality` and 4:2:0 colour (subsampling 2) below quality 90."""
    options = SAVE_OPTIONS[image_format]
    if jpeg_quality is None:
        return options
    return {**options, "quality": jpeg_quality, "subsampling": 0 if jpeg_quality >= 90 else 2}


def save_row_image(cell, path, fetch, max_bytes, save_kwargs, min_side=None, max_side=None, center_crop=None):
    """Fetch (`fetch`: url -> bytes; None: the cell holds the image) or take one row's image, check it (at most
    `max_bytes`, shorter side at least `min_side`), shrink it to `max_side` or crop it to `center_crop` and save it
    atomically with PIL's `save_kwargs` (save_options). Returns None, or the failure reason."""
    try:
        data = fetch(cell) if fetch is not None else stored_image(cell)
        if isinstance(data, (bytes, bytearray)) and len(data) > max_bytes:
            raise RowFailed("too large")
        img = decode_rgb(data)
        if min_side and min(img.size) < min_side:
            raise RowFailed("filtered min_side")
    except RowFailed as failure:
        return failure.reason
    if max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    if center_crop:  # crops the centre to a square, then resizes it to N x N
        img = ImageOps.fit(img, (center_crop, center_crop), Image.Resampling.LANCZOS)
    try:
        atomic_write(path, lambda f: img.save(f, **save_kwargs))
    except OSError as err:  # disk full, folder removed, ...: stop rather than fail every row
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None
    return None


# ----------------------------------------------------------------------------------------------
# The output folder: what is already saved, and appending metadata lines safely


def prepare_output_dir(path):
    output_dir = check_output_folder(path, "--output_dir")
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in output_dir.glob(".*.tmp"):  # left by a killed atomic write
        stale.unlink()
    return output_dir


def row_index(file_name):
    """Row index from a file name this script writes (00000042.jpg -> 42), else None."""
    stem = Path(file_name).stem
    return int(stem) if Path(file_name).parent == Path(".") and stem.isdigit() else None


def load_saved(output_dir, metadata_columns):
    """Row indices already saved, after repairing metadata.jsonl: a torn last line (crash mid-append),
    lines whose image is missing and duplicate lines are dropped. Returns (indices, number of images)."""
    path = output_dir / METADATA
    if not path.exists():
        return set(), 0
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = text.splitlines()
    kept, names, saved = [], set(), set()
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        name = record.get("file_name") if isinstance(record, dict) else None
        if not isinstance(name, str) or name in names or not (output_dir / name).is_file():
            continue
        if not kept and set(record) - {"file_name"} != set(metadata_columns):
            raise UserError(
                f"{path} holds metadata columns [{', '.join(sorted(set(record) - {'file_name'}))}], not the requested "
                f"[{', '.join(sorted(metadata_columns))}]: use the same --metadata_columns or a new --output_dir"
            )
        kept.append(line)
        names.add(name)
        if row_index(name) is not None:
            saved.add(row_index(name))
    if len(kept) != len(lines) or (text and not text.endswith("\n")):
        atomic_write(path, lambda f: f.write("".join(line + "\n" for line in kept)), mode="w")
        print(f"repaired {path}: dropped {len(lines) - len(kept)} torn, duplicate or orphaned line(s)", file=sys.stderr)
    return saved, len(kept)


def append_metadata(file, record):
    """One line per saved image, on disk (fsync) before the next row counts as done."""
    file.write(json.dumps(record, default=str) + "\n")
    file.flush()
    os.fsync(file.fileno())


def summary(counts, output_dir, images):
    failures = {reason: n for reason, n in sorted(counts.items()) if reason not in ("saved", "skipped")}
    line = f"saved {counts['saved']}, skipped {counts['skipped']} (already present), failed {sum(failures.values())}"
    if failures:
        line += " (" + ", ".join(f"{reason}: {n}" for reason, n in failures.items()) + ")"
    return line + f"; {output_dir} holds {images} images"


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    dataset = open_stream(args.dataset_name, args.split)
    features = dataset.features
    try:
        columns = list(features) if features is not None else list(next(iter(dataset)))
    except StopIteration:
        raise UserError(f"split {args.split!r} of dataset {args.dataset_name} is empty") from None
    image_key = args.image_bytes_key or args.url_key
    missing = [c for c in [image_key, *args.metadata_columns] if c not in columns]
    if missing:
        raise UserError(
            f"dataset {args.dataset_name} has no column {', '.join(missing)} (columns: {', '.join(columns)})"
        )
    filters = score_filters({flag: getattr(args, flag) for flag, _, _ in SCORE_FLAGS}, columns)
    size_columns = [find_column(columns, "width"), find_column(columns, "height")]
    size_columns = size_columns if args.min_side and None not in size_columns else []
    class_names = class_label_names(features or {})
    if features is not None and isinstance(features.get(image_key), datasets.Image):
        dataset = dataset.cast_column(image_key, datasets.Image(decode=False))  # bytes, decoded once by us
    wanted = [image_key, *args.metadata_columns, *[f[1] for f in filters], *size_columns]
    dataset = dataset.select_columns(list(dict.fromkeys(wanted)))

    output_dir = prepare_output_dir(args.output_dir)
    saved, images = load_saved(output_dir, args.metadata_columns)
    rows = enumerate(dataset)
    if args.rows is not None and args.rows != -1:
        rows = itertools.islice(rows, args.rows)

    counts = Counter(saved=0, skipped=0)
    in_flight = {}  # future -> metadata record, at most 2 * workers rows in memory
    progress = tqdm(total=None if args.rows in (None, -1) else args.rows, unit="row", desc="download_hf", mininterval=1)
    executor = ThreadPoolExecutor(args.workers)
    fetch = functools.partial(download, timeout=args.timeout, max_bytes=args.max_bytes, retries=args.retries,
                              backoff=args.backoff) if args.url_key else None
    save_image = functools.partial(save_row_image, fetch=fetch, max_bytes=args.max_bytes,
                                   save_kwargs=save_options(args.image_format, args.jpeg_quality),
                                   min_side=args.min_side, max_side=args.max_side, center_crop=args.center_crop)

    def finish(futures):
        nonlocal images
        for future in futures:
            record = in_flight.pop(future)
            reason = future.result()
            if reason is None:
                append_metadata(metadata_file, record)
                images += 1
            counts[reason or "saved"] += 1
            progress.update()

    try:
        with open(output_dir / METADATA, "a", encoding="utf-8") as metadata_file:
            for index, row in rows:
                reason = "skipped" if index in saved else prefilter_reason(row, filters, size_columns, args.min_side)
                if reason:
                    counts[reason] += 1
                    progress.update()
                    continue
                file_name = f"{index:08d}.{args.image_format}"
                record = {"file_name": file_name}
                record.update({c: json_value(row[c], class_names.get(c)) for c in args.metadata_columns})
                in_flight[executor.submit(save_image, row[image_key], output_dir / file_name)] = record
                if len(in_flight) >= 2 * args.workers:
                    finish(wait(in_flight, return_when=FIRST_COMPLETED).done)
            finish(wait(in_flight).done)
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
        progress.close()
        print(summary(counts, output_dir, images))
    return 0


if __name__ == "__main__":
    run_cli(main)
