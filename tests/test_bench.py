"""bench.py at tiny sizes: every section runs and reports its figures, ratios and peak memory (speeds unchecked, but
the ratios and the cli rows are held to the timings they come from)."""
import json
import sys
import time
from pathlib import Path

import pytest
import torch

import bench
from devices import native_bf16

TINY = ["--unet_size", "tiny", "--vqgan_config", "vq-f4-tiny", "--vqgan_resolutions", "32", "--batch_size", "2",
        "--repeats", "1", "--sample_batch", "1", "--max_sampler_steps", "2"]


def rows_of(path):
    return {row["what"]: row for row in json.loads(path.read_text())["rows"]}


def test_every_section_reports_figures_and_ratios(tmp_path, image_folder, monkeypatch):
    from test_diffusion import write_checkpoint

    write_checkpoint(tmp_path)
    out = tmp_path / "bench.json"
    reported, commands = {}, {}  # images -> what cli_seconds returned; -> (wall time, PNGs written) of its command
    cli_seconds, run_command = bench.cli_seconds, bench.subprocess.run

    def timed_command(command, **kwargs):
        start = time.perf_counter()
        done = run_command(command, **kwargs)
        took = time.perf_counter() - start
        images = len(list(Path(command[command.index("--outdir") + 1]).glob("0*.png")))
        commands[int(command[command.index("--num_images") + 1])] = (took, images)
        return done

    monkeypatch.setattr(bench.subprocess, "run", timed_command)
    monkeypatch.setattr(bench, "cli_seconds", lambda n, *rest: reported.setdefault(n, cli_seconds(n, *rest)))
    assert bench.main(TINY + ["--images", str(image_folder), "--out", str(out), "--cli_images", "1", "3",
                              "--cli_checkpoint", str(tmp_path / "unet")]) == 0
    rows = rows_of(out)
    assert {row["section"] for row in rows.values()} >= {"vqgan", "unet", "train", "sampler", "cli"}
    for row in rows.values():
        figure = next(row[k] for k in bench.FIGURES if k in row)
        if "start-up excluded" not in row["what"]:  # that one is a difference of two timings: checked below
            assert 0 < figure < float("inf")
        assert row["peak_mb"] is None or row["peak_mb"] > 0

    unet = [what for what, row in rows.items() if row["section"] == "unet"]
    assert sum("channels-last" in what for what in unet) * 2 == len(unet) == 4 * (1 + native_bf16(torch.device("cpu")))
    assert any("bf16" in what for what in unet) == native_bf16(torch.device("cpu"))  # emulated bf16 is not timed

    train = [row for row in rows.values() if row["section"] == "train"]
    with_cache, without_cache, speed_up = train
    assert "latent cache" in with_cache["what"] and str(image_folder) in without_cache["what"]
    assert speed_up["ratio"] == pytest.approx(with_cache["samples_per_s"] / without_cache["samples_per_s"])

    ddpm = rows["ddpm-1000 tiny fp32 (timed on 2 steps, scaled)"]
    dpmpp = rows["dpmpp-2m-20 tiny fp32 (timed on 2 steps, scaled)"]
    speed_up = next(row for what, row in rows.items() if what.startswith("dpmpp-2m-20 speed-up over ddpm-1000"))
    assert speed_up["ratio"] == pytest.approx(ddpm["s_per_image"] / dpmpp["s_per_image"])
    cli = [row for row in rows.values() if row["section"] == "cli"]
    assert "1 images, start-up included" in cli[0]["what"] and "((3 - 1 images) / 2)" in cli[1]["what"]
    # each timing covers its whole command (which wrote its images) and little else, and the rows are made of them
    # (the difference itself is timing noise at 1 vs 3 tiny images: it may even be negative)
    assert reported.keys() == commands.keys() == {1, 3}
    for images, (took, written) in commands.items():
        assert written == images and took <= reported[images] < 2 * took
    assert cli[0]["s_per_image"] == reported[1] and cli[1]["s_per_image"] == (reported[3] - reported[1]) / 2


def test_diffusers_section(tmp_path, capsys, monkeypatch):
    """With diffusers: matched UNets and DDIM timed, parameter counts in the labels; without it: one line."""
    pytest.importorskip("diffusers")
    out = tmp_path / "bench.json"
    assert bench.main(TINY + ["--sections", "diffusers", "--out", str(out)]) == 0
    rows = list(rows_of(out).values())
    assert [row["what"].split()[0] for row in rows[:4]] == ["ours", "ours", "diffusers", "diffusers"]
    assert all("M)" in row["what"] for row in rows[:4])
    assert [row["what"] for row in rows if "ratio" in row] == [
        "forward speed-up ours/diffusers", "train step speed-up ours/diffusers", "ddim-50 speed-up ours/diffusers"]
    work = {row["what"].split()[0]: row["gflop_per_sample"] for row in rows if "gflop_per_sample" in row}
    assert work["ours"] > work["diffusers"] > 0  # the same convolutions; ours adds feed-forward layers
    forward_rate = {row["what"].split()[0]: row["samples_per_s"] for row in rows if "forward fp32" in row["what"]}
    for row in rows:
        if "gflop_per_s" in row:
            who = row["what"].split()[0]
            assert row["gflop_per_s"] == pytest.approx(work[who] * forward_rate[who])

    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    assert bench.main(TINY + ["--sections", "diffusers", "--out", str(out)]) == 0
    assert "pip install diffusers" in capsys.readouterr().out
    assert rows_of(out) == {}


def test_cli_section_arithmetic(monkeypatch):
    """Per image with start-up = time(FEW) / FEW; without it = (time(MANY) - time(FEW)) / (MANY - FEW)."""
    monkeypatch.setattr(bench, "cli_seconds", lambda n, checkpoint, device: {16: 20.0, 48: 36.0}[n])
    with_start_up, without = bench.bench_cli("cpu", images=[16, 48], checkpoint=None)
    assert with_start_up["s_per_image"] == pytest.approx(20.0 / 16) and without["s_per_image"] == pytest.approx(0.5)
