"""download_hf.py driven as a user runs it: a local parquet dataset of image bytes, a URL dataset
served by a loopback HTTP server (127.0.0.1 only), the local WikiArt-mini set, and bad input."""
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import datasets
import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from conftest import ROOT, make_painting

STYLES = ["Baroque", "Impressionism", "Expressionism"]
SUMMARY = re.compile(
    r"saved (\d+), skipped (\d+) \(already present\), failed (\d+)(?: \((.*)\))?; (.*) holds (\d+) images"
)


def command(*args):
    return [sys.executable, "download_hf.py", *map(str, args)]


def run(*args):
    result = subprocess.run(command(*args), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


def parse_summary(stdout):
    """The closing line as {"saved": n, "skipped": n, reason: n, ...} plus the image count."""
    match = SUMMARY.fullmatch(stdout.strip().splitlines()[-1])
    assert match, stdout
    saved, skipped, failed, reasons, _, images = match.groups()
    counts = {"saved": int(saved), "skipped": int(skipped)}
    for part in reasons.split(", ") if reasons else []:
        reason, n = part.rsplit(": ", 1)
        counts[reason] = int(n)
    assert sum(counts.values()) - counts["saved"] - counts["skipped"] == int(failed)
    return counts, int(images)


def read_metadata(folder):
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def png_bytes(img):
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------
# A local dataset of image bytes: 6 rows, row 4 holds bytes that are not an image


@pytest.fixture
def bytes_dataset(tmp_path):
    paintings = [png_bytes(make_painting(i, size=(40 + 8 * i, 32))) for i in range(6)]
    paintings[4] = b"this is not an image"
    features = datasets.Features(
        {"image": datasets.Image(), "raw": datasets.Value("binary"), "style": datasets.ClassLabel(names=STYLES)}
    )
    rows = {"image": [{"bytes": b, "path": None} for b in paintings], "raw": paintings,
            "style": [i % 3 for i in range(6)]}
    folder = tmp_path / "paintings"
    (folder / "data").mkdir(parents=True)
    parquet = folder / "data" / "train-00000-of-00001.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(parquet))
    return folder


def test_image_bytes_folder_round_trip_resume_and_repair(bytes_dataset, tmp_path):
    out = tmp_path / "out"
    args = ["--dataset_name", bytes_dataset, "--image_bytes_key", "image", "--metadata_columns", "style",
            "--output_dir", out, "--workers", 2]
    first = run(*args)
    assert first.stdout.strip().splitlines()[-1] == (
        f"saved 5, skipped 0 (already present), failed 1 (not an image: 1); {out} holds 5 images"
    )
    records = read_metadata(out)
    expected = {f"{i:08d}.jpg": STYLES[i % 3] for i in (0, 1, 2, 3, 5)}
    assert {r["file_name"]: r["style"] for r in records} == expected and len(records) == 5
    for i in (0, 1, 2, 3, 5):
        with Image.open(out / f"{i:08d}.jpg") as img:
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (40 + 8 * i, 32))
    assert not (out / "00000004.jpg").exists()

    folder = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    assert folder.num_rows == 5
    assert sorted(folder["style"]) == sorted(expected.values())
    assert sorted(img.size for img in folder["image"]) == sorted((40 + 8 * i, 32) for i in (0, 1, 2, 3, 5))

    second = run(*args)  # resume: nothing new, no duplicate lines
    assert parse_summary(second.stdout) == ({"saved": 0, "skipped": 5, "not an image": 1}, 5)
    assert read_metadata(out) == records

    # Crash damage: row 2's image was rewritten but its line never appended, row 3's image is gone
    # (its line must not survive), and the last append was torn.
    (out / "00000002.jpg").write_bytes(b"half-written")
    (out / "00000003.jpg").unlink()
    lines = [json.dumps(r) for r in records if r["file_name"] != "00000002.jpg"]
    (out / "metadata.jsonl").write_text("\n".join(lines) + '\n{"file_name": "0000')
    third = run(*args)
    assert parse_summary(third.stdout) == ({"saved": 2, "skipped": 3, "not an image": 1}, 5)
    assert "repaired" in third.stderr
    repaired = read_metadata(out)
    assert sorted(r["file_name"] for r in repaired) == sorted(expected)
    with Image.open(out / "00000002.jpg") as img:
        assert img.size == (56, 32)
    with Image.open(out / "00000003.jpg") as img:
        assert img.size == (64, 32)


def test_raw_bytes_column_rows_max_side_png(bytes_dataset, tmp_path):
    out = tmp_path / "small"
    result = run("--dataset_name", bytes_dataset, "--image_bytes_key", "raw", "--metadata_columns", "style",
                 "--rows", 3, "--max_side", 20, "--image_format", "png", "--output_dir", out, "--workers", 1)
    assert parse_summary(result.stdout) == ({"saved": 3, "skipped": 0}, 3)
    assert sorted(p.name for p in out.iterdir()) == ["00000000.png", "00000001.png", "00000002.png", "metadata.jsonl"]
    for i in range(3):
        with Image.open(out / f"{i:08d}.png") as img:
            width, height = img.size
            assert img.format == "PNG" and img.mode == "RGB" and width == 20
            assert abs(height - 20 * 32 / (40 + 8 * i)) <= 1  # aspect kept


# ----------------------------------------------------------------------------------------------
# A URL dataset with LAION-like columns, served from 127.0.0.1


@pytest.fixture
def image_server():
    """(base URL, Counter of requests per path). Routes: /good/N, /small, /missing (404), /flaky (500 once,
    then OK), /error500, /slow (answers after 1.5 s), /junk (not an image), /huge and /huge_stream (50 kB)."""
    hits, lock = Counter(), threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            with lock:
                hits[self.path] += 1
                hit = hits[self.path]
            status, body, send_length = 200, None, True
            if self.path.startswith("/good/"):
                body = png_bytes(make_painting(int(self.path.rsplit("/", 1)[1])))
            elif self.path == "/small":
                body = png_bytes(make_painting(0, size=(16, 16)))
            elif self.path == "/missing":
                status, body = 404, b"not found"
            elif self.path == "/flaky":
                status, body = (500, b"busy") if hit == 1 else (200, png_bytes(make_painting(3)))
            elif self.path == "/error500":
                status, body = 500, b"broken"
            elif self.path == "/slow":
                time.sleep(1.5)
                body = png_bytes(make_painting(0))
            elif self.path == "/junk":
                body = b"<html>definitely not an image</html>"
            elif self.path in ("/huge", "/huge_stream"):
                body, send_length = os.urandom(50_000), self.path == "/huge"
            try:
                self.send_response(status)
                if send_length:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout, too large)
                pass

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()
    server.server_close()


def test_url_rows_download_retry_filters_and_resume(image_server, tmp_path):
    base, hits = image_server
    rows = [  # path, punsafe, pwatermark, aesthetic, WIDTH, HEIGHT
        ("/good/0", 0.1, 0.1, 6.0, 40, 32),
        ("/good/1", 0.1, 0.1, 6.0, None, None),
        ("/missing", 0.1, 0.1, 6.0, 40, 32),
        ("/flaky", 0.1, 0.1, 6.0, 40, 32),
        ("/slow", 0.1, 0.1, 6.0, 40, 32),
        ("/junk", 0.1, 0.1, 6.0, 40, 32),
        ("/huge", 0.1, 0.1, 6.0, 40, 32),
        ("/huge_stream", 0.1, 0.1, 6.0, 40, 32),
        ("/error500", 0.1, 0.1, 6.0, 40, 32),
        ("/good/9", 0.9, 0.1, 6.0, 40, 32),
        ("/good/10", 0.1, 0.95, 6.0, 40, 32),
        ("/good/11", 0.1, 0.1, 3.0, 40, 32),
        ("/good/12", 0.1, 0.1, 6.0, 10, 10),
        ("/small", 0.1, 0.1, 6.0, 64, 64),  # metadata says big enough, the image is 16x16
        ("not a url", 0.1, 0.1, 6.0, 40, 32),
    ]
    table = {
        "URL": [path if path == "not a url" else base + path for path, *_ in rows],
        "TEXT": [f"painting {i} \u00e9t\u00e9" for i in range(len(rows))],
        "punsafe": [r[1] for r in rows], "pwatermark": [r[2] for r in rows], "aesthetic": [r[3] for r in rows],
        "WIDTH": [r[4] for r in rows], "HEIGHT": [r[5] for r in rows],
    }
    parquet = tmp_path / "laion.parquet"
    datasets.Dataset.from_dict(table).to_parquet(str(parquet))
    out = tmp_path / "laion_out"
    args = ["--dataset_name", parquet, "--url_key", "URL", "--metadata_columns", "TEXT", "WIDTH", "HEIGHT", "punsafe",
            "--output_dir", out, "--workers", 4, "--timeout", 0.5, "--retries", 2, "--backoff", 0.01,
            "--max_bytes", 20_000, "--min_side", 24,
            "--max_punsafe", 0.5, "--max_pwatermark", 0.8, "--min_aesthetic", 5]
    failures = {"http 404": 1, "timeout": 1, "not an image": 1, "too large": 2, "http 500": 1, "filtered punsafe": 1,
                "filtered pwatermark": 1, "filtered aesthetic": 1, "filtered min_side": 2, "bad url": 1}

    first = run(*args)
    assert parse_summary(first.stdout) == ({"saved": 3, "skipped": 0, **failures}, 3)
    assert hits["/flaky"] == 2 and hits["/error500"] == 3 and hits["/slow"] == 3  # retried
    assert hits["/missing"] == 1 and hits["/junk"] == 1 and hits["/huge"] == 1  # final at once
    assert all(hits[p] == 0 for p in ("/good/9", "/good/10", "/good/11", "/good/12"))  # filtered before download
    records = sorted(read_metadata(out), key=lambda r: r["file_name"])
    assert records == [
        {"file_name": f"{i:08d}.jpg", "TEXT": f"painting {i} \u00e9t\u00e9", "WIDTH": width, "HEIGHT": height,
         "punsafe": 0.1}
        for i, width, height in [(0, 40, 32), (1, None, None), (3, 40, 32)]
    ]
    assert sorted(p.name for p in out.glob("*.jpg")) == [r["file_name"] for r in records]
    for record in records:
        with Image.open(out / record["file_name"]) as img:
            assert (img.mode, img.size) == ("RGB", (40, 32))

    second = run(*args)  # saved rows are not fetched again; failed rows are tried again
    assert parse_summary(second.stdout) == ({"saved": 0, "skipped": 3, **failures}, 3)
    assert hits["/flaky"] == 2 and hits["/good/0"] == 1 and hits["/missing"] == 2
    assert sorted(read_metadata(out), key=lambda r: r["file_name"]) == records


# ----------------------------------------------------------------------------------------------


def test_wikiart_mini_to_imagefolder(wikiart_mini, tmp_path):
    out = tmp_path / "wikiart_images"
    result = run("--dataset_name", wikiart_mini, "--image_bytes_key", "image", "--metadata_columns", "style",
                 "--rows", 20, "--output_dir", out, "--workers", 2)
    assert parse_summary(result.stdout) == ({"saved": 20, "skipped": 0}, 20)
    source = datasets.load_dataset(str(wikiart_mini), split="train", streaming=True)
    names = source.features["style"].names
    expected = {f"{i:08d}.jpg": names[row["style"]] for i, row in enumerate(source.select_columns(["style"]).take(20))}
    folder = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    assert folder.num_rows == 20
    assert sorted(folder["style"]) == sorted(expected.values())
    assert set(folder["style"]) <= set(names) and "Impressionism" in names
    assert {r["file_name"]: r["style"] for r in read_metadata(out)} == expected


def test_wikiart_mini_center_crop_and_jpeg_quality(wikiart_mini, tmp_path):
    base = ["--dataset_name", wikiart_mini, "--image_bytes_key", "image", "--metadata_columns", "style",
            "--rows", 4, "--workers", 2]
    crops, default, low = tmp_path / "crops", tmp_path / "q95", tmp_path / "q50"
    result = run(*base, "--center_crop", 32, "--output_dir", crops)
    assert parse_summary(result.stdout) == ({"saved": 4, "skipped": 0}, 4)
    source = datasets.load_dataset(str(wikiart_mini), split="train", streaming=True)
    names = source.features["style"].names
    rows = list(source.take(4))
    assert {r["file_name"]: r["style"] for r in read_metadata(crops)} == {
        f"{i:08d}.jpg": names[row["style"]] for i, row in enumerate(rows)}
    assert sorted(p.name for p in crops.glob("*.jpg")) == [f"{i:08d}.jpg" for i in range(4)]
    for i, row in enumerate(rows):
        with Image.open(crops / f"{i:08d}.jpg") as img:
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (32, 32))
            # the centre of the painting, not a squashed whole: compare with a reference centre crop
            reference = row["image"].convert("RGB")
            side = min(reference.size)
            left, top = (reference.width - side) // 2, (reference.height - side) // 2
            reference = reference.crop((left, top, left + side, top + side)).resize((32, 32), Image.Resampling.LANCZOS)
            difference = np.abs(np.asarray(img, dtype=float) - np.asarray(reference, dtype=float)).mean()
            assert difference < 8, difference  # a squashed, uncropped resize gives 19..31

    run(*base, "--output_dir", default)
    run(*base, "--jpeg_quality", 50, "--output_dir", low)
    for i in range(4):
        name = f"{i:08d}.jpg"
        assert (low / name).stat().st_size < 0.7 * (default / name).stat().st_size
        with Image.open(default / name) as high_img, Image.open(low / name) as low_img:
            assert high_img.size == low_img.size
            assert JpegImagePlugin.get_sampling(high_img) == 0 and JpegImagePlugin.get_sampling(low_img) == 2


# name -> (arguments, text the one-line error must contain); DS, MISSING, OUT, BLOCKED and FOLDER stand for paths
BAD_INPUT = {
    "no key": ("--dataset_name DS --output_dir OUT", "exactly one of --image_bytes_key"),
    "both keys": ("--dataset_name DS --image_bytes_key image --url_key URL --output_dir OUT", "exactly one of"),
    "rows 0": ("--dataset_name DS --image_bytes_key image --rows 0 --output_dir OUT", "--rows must be"),
    "negative workers": ("--dataset_name DS --image_bytes_key image --workers -2 --output_dir OUT",
                         "argument --workers: must be at least 1, got -2 (see download_hf.py -h)"),
    "unknown dataset": ("--dataset_name nobody/no-such-dataset --image_bytes_key image --output_dir OUT",
                        "nobody/no-such-dataset"),
    "missing parquet": ("--dataset_name MISSING --image_bytes_key image --output_dir OUT", "none*.parquet"),
    "unknown split": ("--dataset_name DS --split validation --image_bytes_key image --output_dir OUT",
                      "no split 'validation'"),
    "image key": ("--dataset_name DS --image_bytes_key picture --output_dir OUT",
                  "no column picture (columns: image, raw, style)"),
    "metadata column": ("--dataset_name DS --image_bytes_key image --metadata_columns artist genre style "
                        "--output_dir OUT",
                        "no column artist, genre (columns: image, raw, style)"),
    "crop and max_side": ("--dataset_name DS --image_bytes_key image --center_crop 32 --max_side 64 --output_dir OUT",
                          "--center_crop (square images) or --max_side"),
    "jpeg quality 0": ("--dataset_name DS --image_bytes_key image --jpeg_quality 0 --output_dir OUT",
                       "--jpeg_quality must be 1..100"),
    "jpeg quality png": ("--dataset_name DS --image_bytes_key image --jpeg_quality 80 --image_format png "
                         "--output_dir OUT", "--jpeg_quality applies to JPEG only"),
    "filter column": ("--dataset_name DS --image_bytes_key image --max_punsafe 0.5 --output_dir OUT",
                      "'punsafe' column"),
    "unwritable output": ("--dataset_name DS --image_bytes_key image --output_dir BLOCKED",
                          "a_file is a file, not a folder"),
    "other columns already": ("--dataset_name DS --image_bytes_key image --output_dir FOLDER",
                              "use the same --metadata_columns"),
}


def bad_input_args(case, bytes_dataset, image_folder, tmp_path):
    blocker = tmp_path / "a_file"  # a file where a folder should be: unwritable even for root
    blocker.write_text("x")
    paths = {"DS": bytes_dataset, "MISSING": tmp_path / "none*.parquet", "OUT": tmp_path / "out",
             "BLOCKED": blocker / "sub", "FOLDER": image_folder}
    return [str(paths.get(word, word)) for word in BAD_INPUT[case][0].split()]


def check_one_line_error(status, stderr, expected):
    lines = stderr.strip().splitlines()
    assert status == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    assert expected in lines[0], lines[0]


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_line_error(case, bytes_dataset, image_folder, tmp_path, capfd):
    """Each case through run_cli in this process (what `python download_hf.py` runs), for speed."""
    import download_hf
    from cli import run_cli

    args, expected = bad_input_args(case, bytes_dataset, image_folder, tmp_path), BAD_INPUT[case][1]
    old_metadata = (image_folder / "metadata.jsonl").read_text()
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: download_hf.main(args))
    check_one_line_error(exit_info.value.code, capfd.readouterr().err, expected)
    assert not (tmp_path / "out").exists()  # nothing written for bad input
    assert (image_folder / "metadata.jsonl").read_text() == old_metadata


def test_bad_input_from_the_command_line(bytes_dataset, image_folder, tmp_path):
    """A few cases as real processes: an argument error, a dataset that cannot load, a missing column."""
    names = ["both keys", "unknown dataset", "metadata column", "crop and max_side"]
    processes = {name: subprocess.Popen(command(*bad_input_args(name, bytes_dataset, image_folder, tmp_path)),
                                        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for name in names}
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=120)
        check_one_line_error(process.returncode, stderr, BAD_INPUT[name][1])
    assert not (tmp_path / "out").exists()
