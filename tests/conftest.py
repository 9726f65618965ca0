"""Shared test fixtures. No test reaches the internet: the hub is switched off here."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WIKIART_MINI = ROOT.parent / "shared" / "wikiart-mini"

# Tests use tiny models: one thread is faster than two for small tensors (and on a busy machine, far faster).
torch.set_num_threads(1)


@pytest.fixture
def wikiart_mini():
    """Path of the local WikiArt-mini dataset; the test is skipped where it is absent."""
    if not (WIKIART_MINI / "data").is_dir():
        pytest.skip(f"WikiArt-mini not found at {WIKIART_MINI}")
    return WIKIART_MINI


def make_painting(seed, size=(40, 32)):
    """A small synthetic 'painting': smooth colour gradients plus a few blobs, deterministic per seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    base = rng.uniform(0, 1, 3)[None, None, :] + rng.uniform(-0.5, 0.5, 3)[None, None, :] * (xx + yy)[..., None]
    for _ in range(3):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 0.3)
        mask = ((xx - cx) ** 2 + (yy - cy) ** 2 < r**2)[..., None]
        base = np.where(mask, rng.uniform(0, 1, 3)[None, None, :], base)
    return Image.fromarray((np.clip(base, 0, 1) * 255).astype(np.uint8))


def write_image_folder(folder, styles, count=12):
    """An ImageFolder (as download_hf.py writes it) of `count` small paintings, painting i of style i % len(styles)."""
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as f:
        for i in range(count):
            name = f"{i:08d}.png"
            make_painting(i).save(folder / name)
            f.write(json.dumps({"file_name": name, "style": styles[i % len(styles)]}) + "\n")
    return folder


@pytest.fixture
def image_folder(tmp_path):
    """An ImageFolder of 12 small paintings with style metadata."""
    return write_image_folder(tmp_path / "images", ["Baroque", "Impressionism", "Expressionism"])


def sigterm_after_log_lines(script_args, log_path, lines, timeout=120):
    """Run `python SCRIPT ARGS...` in the repository, send SIGTERM once `log_path` holds `lines` lines, and return
    (exit status, stdout, stderr)."""
    process = subprocess.Popen([sys.executable, *map(str, script_args)], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + timeout
        while not (log_path.is_file() and len(log_path.read_text().splitlines()) >= lines):
            assert process.poll() is None and time.time() < deadline, process.stderr.read()
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    return process.returncode, stdout, stderr
