"""studio.py: its API through gradio_client on a tiny model (each endpoint, the bad inputs, three requests at once),
and the page in a real headless Chromium on the bundled models. Every server a test starts is stopped after it."""
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")

import diffusion  # noqa: E402
import studio  # noqa: E402
from test_diffusion import write_checkpoint  # noqa: E402
import test_image_embedding  # noqa: E402
from vqgan import CONFIGS, VQModel, save_vqgan  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
# The endpoints' arguments in order, as the README lists them, with the widget each one is.
ENDPOINTS = {
    "/generate": ["prompt Textbox", "negative_prompt Textbox", "seed Number", "count Slider", "steps Slider",
                  "guidance_scale Number", "sampler Dropdown"],
    "/img2img": ["image Image", "strength Slider", "prompt Textbox", "negative_prompt Textbox", "seed Number",
                 "count Slider", "steps Slider", "guidance_scale Number", "sampler Dropdown"],
    "/interpolate": ["seed Number", "seed_to Number", "frames Slider", "prompt Textbox", "negative_prompt Textbox",
                     "steps Slider", "guidance_scale Number", "sampler Dropdown"],
}
# fixtures: a tiny model trained with --image_embeddings, and the paintings it was trained on
embedded, like_model = test_image_embedding.embedded, test_image_embedding.like_model
VARIATIONS = ["image Image", "image_b Image", "mix Slider", "strength Slider", "prompt Textbox",
              "negative_prompt Textbox", "seed Number", "count Slider", "steps Slider", "guidance_scale Number",
              "sampler Dropdown"]


def start_studio(folder, *flags, timeout=120):
    """`python studio.py FLAGS` on a free port, run from `folder` (its only other writes go to a private
    GRADIO_TEMP_DIR); returns (process, url, outdir) once the page answers."""
    workdir, outdir, port = folder / "work", folder / "work" / "studio_outputs", studio.free_port()
    workdir.mkdir()
    env = {**os.environ, "GRADIO_TEMP_DIR": str(folder / "gradio"), "GRADIO_ANALYTICS_ENABLED": "False",
           "OMP_NUM_THREADS": "1"}
    log = open(folder / "server.log", "w")
    process = subprocess.Popen([sys.executable, str(ROOT / "studio.py"), "--port", str(port), *map(str, flags)],
                               cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        studio.wait_until_served(url, process, timeout)
    except studio.UserError:
        stop(process)
        raise AssertionError((folder / "server.log").read_text()) from None
    return process, url, outdir


def stop(process):
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def tiny_studio(tmp_path_factory):
    """A studio on a tiny conditional model (32 x 32 paintings) decoding with another VQGAN than its own (--vqgan),
    in fp32 on every CPU: (url, outdir, workdir, checkpoint)."""
    models = tmp_path_factory.mktemp("ckpt")
    checkpoint = write_checkpoint(models, context_dim=384, prediction_type="epsilon")
    torch.manual_seed(1)
    save_vqgan(VQModel(CONFIGS["vq-f4-tiny"]).eval(), models / "other-vqgan")
    folder = tmp_path_factory.mktemp("studio")
    process, url, outdir = start_studio(folder, "--unet", checkpoint, "--vqgan", models / "other-vqgan",
                                        "--max_images", 16, "--precision", "fp32")
    yield url, outdir, outdir.parent, checkpoint
    stop(process)


@pytest.fixture(scope="module")
def like_studio(tmp_path_factory, like_model):
    """A studio on a tiny model trained with --image_embeddings (so with a Variations tab): (url, outdir)."""
    process, url, outdir = start_studio(tmp_path_factory.mktemp("like-studio"), "--unet", like_model,
                                        "--precision", "fp32")
    yield url, outdir
    stop(process)


@pytest.fixture
def client(tiny_studio, tmp_path):
    return gradio_client.Client(tiny_studio[0], download_files=str(tmp_path / "downloads"), verbose=False)


def png_text(path):
    with Image.open(path) as img:
        return {key: img.text[key] for key in ("parameters", "command")}


def pixels(path):
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def regenerate(command, outdir):
    """Run a PNG's recorded `python diffusion.py ...` command in this process, writing to outdir; its images."""
    argv = shlex.split(command)
    assert argv[:2] == ["python", "diffusion.py"]
    assert diffusion.main([*argv[2:], "--outdir", str(outdir)]) == 0
    return sorted(p for p in outdir.glob("[0-9]*.png"))


def same_painting(a, b):
    """Batched and single matmuls may round differently: one level of 255 apart at most."""
    return np.abs(pixels(a).astype(int) - pixels(b)).max() <= 1


def images_of(gallery):
    return [Path(item["image"]) for item in gallery]


# ----------------------------------------------------------------------------------------------
# The API


def test_every_endpoint_has_its_name_and_its_arguments_in_order(client):
    named = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {name: [f"{p['parameter_name']} {p['component']}" for p in named[name]["parameters"]]
            for name in ENDPOINTS} == ENDPOINTS
    assert set(named) == set(ENDPOINTS)  # the page's helpers (style preset, Random) are not part of the API;
    # /variations only where the model takes image embeddings (test_variations_...)


def test_generate_saves_each_painting_with_the_command_that_regenerates_it(client, tiny_studio, tmp_path):
    _, outdir, _, checkpoint = tiny_studio
    gallery = client.predict("a Baroque painting", "dark", 5, 2, 3, 2.5, "ddim", api_name="/generate")
    downloads = images_of(gallery)
    assert len(downloads) == 2
    for offset, path in enumerate(downloads):
        saved = outdir / path.name  # the same file, kept under --outdir
        assert path.read_bytes() == saved.read_bytes()
        text = png_text(path)
        params = json.loads(text["parameters"])
        assert (params["seed"], params["steps"], params["sampler"]) == (5 + offset, 3, "ddim")
        assert (params["prompt"], params["negative_prompt"], params["guidance_scale"]) == ("a Baroque painting",
                                                                                           "dark", 2.5)
        assert f"--unet_ckpt_path {checkpoint} --vqgan {checkpoint.parent / 'other-vqgan'}" in text["command"]
        (again,) = regenerate(text["command"], tmp_path / f"again{offset}")
        assert same_painting(again, path)


def test_an_empty_prompt_samples_unconditionally_at_the_samplers_default_steps(client):
    (path,) = images_of(client.predict("", "", 0, 1, 0, 3.0, "dpmpp-2m", api_name="/generate"))
    params = json.loads(png_text(path)["parameters"])
    assert "prompt" not in params and params["steps"] == diffusion.UNPROMPTED_STEPS["dpmpp-2m"]


def test_progress_follows_the_samplers_steps(client):
    job = client.submit("", "", 0, 1, 200, 3.0, "ddpm", api_name="/generate")
    seen = set()
    while not job.done():
        units = job.status().progress_data or []
        seen |= {unit.index for unit in units if unit.length == 200}
        time.sleep(0.02)  # a poll, not a wait for a result
    assert len(job.result()) == 1
    assert len(seen) >= 2  # the bar moved: at least two different step counts of 200 were reported


def test_img2img_keeps_the_upload_and_its_regenerate_command(client, tiny_studio, tmp_path, monkeypatch):
    _, outdir, workdir, _ = tiny_studio
    upload = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 150, 3), dtype=np.uint8)).save(upload)
    gallery = client.predict(gradio_client.handle_file(str(upload)), 0.5, "", "", 1, 2, 4, 3.0, "dpmpp-2m",
                             api_name="/img2img")
    paths = images_of(gallery)
    assert len(paths) == 2
    params = json.loads(png_text(paths[0])["parameters"])
    assert params["strength"] == 0.5
    kept = workdir / params["init_image"]  # as the server, run from workdir, names it
    assert kept.parent == outdir and kept.is_file()  # the upload outlives Gradio's temporary copy
    assert pixels(kept).shape == (90, 150, 3)
    monkeypatch.chdir(workdir)
    (again,) = regenerate(png_text(paths[0])["command"], tmp_path / "again")
    assert same_painting(again, paths[0])


def test_interpolate_runs_from_one_seed_to_the_other(client, tiny_studio):
    _, outdir, _, _ = tiny_studio
    frames, strip, animation = client.predict(3, 9, 3, "", "", 3, 3.0, "ddim", api_name="/interpolate")
    frames = images_of(frames)
    ends = [images_of(client.predict("", "", seed, 1, 3, 3.0, "ddim", api_name="/generate"))[0] for seed in (3, 9)]
    assert same_painting(frames[0], ends[0]) and same_painting(frames[-1], ends[1])
    assert not same_painting(frames[1], frames[0])
    assert json.loads(png_text(frames[1])["parameters"])["interpolate"] == {"seeds": [3, 9], "frame": 1}
    assert Image.open(strip).size == (3 * 32, 32)
    with Image.open(animation) as webp:
        assert webp.n_frames == 3
    assert (outdir / Path(animation).name).is_file()


BAD_INPUTS = {
    "a text file as an image": ("/img2img", lambda files: [files["notes.txt"], 0.5, "", "", 0, 1, 2, 3.0, "ddim"],
                                "cannot read the upload as an image"),
    "a 40-megapixel image": ("/img2img", lambda files: [files["huge.png"], 0.5, "", "", 0, 1, 2, 3.0, "ddim"],
                             "(40.0 megapixels); at most 16.8"),
    "a count of 0": ("/generate", lambda files: ["", "", 0, 0, 2, 3.0, "ddim"], "less than minimum value 1"),
    "a count of 1000": ("/generate", lambda files: ["", "", 0, 1000, 2, 3.0, "ddim"], "greater than maximum value 16"),
    "a 10,000-character prompt": ("/generate", lambda files: ["a" * 10_000, "", 0, 1, 2, 3.0, "ddim"],
                                  "10,000 characters; at most 1,000"),
    "a seed that is not a number": ("/generate", lambda files: ["", "", "abc", 1, 2, 3.0, "ddim"],
                                    "the seed must be a whole number, got 'abc'"),
    "a negative prompt alone (refused by diffusion.py)": ("/generate", lambda files: ["", "dark", 0, 1, 2, 3.0, "ddim"],
                                                          "--negative_prompt needs a --prompt"),
}


@pytest.fixture(scope="module")
def upload_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uploads")
    (folder / "notes.txt").write_text("not a painting\n")
    Image.new("RGB", (8000, 5000), (120, 80, 40)).save(folder / "huge.png")  # 40 megapixels, a small file
    return {name: gradio_client.handle_file(str(folder / name)) for name in ("notes.txt", "huge.png")}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_a_message_and_the_server_keeps_serving(client, tiny_studio, upload_files, case):
    endpoint, arguments, message = BAD_INPUTS[case]
    written = sorted(tiny_studio[1].iterdir())
    with pytest.raises(gradio_client.exceptions.AppError) as err:
        client.predict(*arguments(upload_files), api_name=endpoint)
    assert message in str(err.value)
    assert sorted(tiny_studio[1].iterdir()) == written  # nothing kept from a refused request
    assert len(client.predict("", "", 0, 1, 1, 3.0, "ddim", api_name="/generate")) == 1


def test_three_requests_at_once_all_finish_with_their_own_files(client, tiny_studio):
    def request(seed):
        return images_of(client.predict("", "", seed, 2, 2, 3.0, "ddim", api_name="/generate"))

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(request, (100, 200, 300)))
    names = [path.name for paths in results for path in paths]
    assert len(names) == 6 and len(set(names)) == 6  # one after another: none overwrote another's numbers
    for seed, paths in zip((100, 200, 300), results):
        assert [json.loads(png_text(p)["parameters"])["seed"] for p in paths] == [seed, seed + 1]


def test_a_port_in_use_is_one_line_before_the_models_load(tiny_studio, tmp_path):
    port = tiny_studio[0].rstrip("/").rsplit(":", 1)[1]
    done = subprocess.run([sys.executable, str(ROOT / "studio.py"), "--port", port, "--outdir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and not (tmp_path / "out").exists()
    assert done.stderr.strip() == (f"error: cannot serve on 127.0.0.1:{port} (Address already in use): pick another "
                                   f"--port or --host")


def test_nothing_is_written_outside_the_outdir(client, tiny_studio):
    _, outdir, workdir, _ = tiny_studio
    client.predict("a Baroque painting", "", 0, 1, 1, 3.0, "ddim", api_name="/generate")
    assert [p.name for p in workdir.iterdir()] == [outdir.name]
    assert not (ROOT / "studio.pyi").exists()  # Gradio writes one beside a module that subclasses a component


# ----------------------------------------------------------------------------------------------
# The page, in a real browser


@pytest.fixture
def bundled_studio(tmp_path):
    """A studio on the bundled models: (url, outdir)."""
    process, url, outdir = start_studio(tmp_path)
    yield url, outdir
    stop(process)


needs_chromium = pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"no Chromium at {CHROMIUM} (apt-get install "
                                                                  f"chromium)")


@contextmanager
def chromium_page(url):
    """A page of headless Debian Chromium (run as root: no sandbox; no background calls out) at `url`; yields
    (page, playwright's expect)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--no-first-run", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1000}, accept_downloads=True)
            page.goto(url)
            yield page, sync_api.expect
        finally:
            browser.close()


def click_generate_and_wait(page, expect, count=4):
    page.get_by_role("button", name="Generate", exact=True).click()
    thumbnails = page.locator("#generate-gallery img")
    expect(thumbnails).to_have_count(count, timeout=120_000)
    return thumbnails


@needs_chromium
def test_browser_types_a_prompt_generates_and_downloads_a_png_with_its_command(bundled_studio, tmp_path):
    url, outdir = bundled_studio
    with chromium_page(url) as (page, expect):
        page.get_by_label("prompt (empty: the unconditional model)").first.fill("a Baroque painting")
        page.get_by_label("steps (0 = the sampler's default)").first.fill("4")
        thumbnails = click_generate_and_wait(page, expect)
        page.screenshot(path=str(tmp_path / "studio.png"))
        thumbnails.first.click()
        with page.expect_download() as download:
            page.locator("#generate-gallery").get_by_role("button", name="Download").first.click()
        downloaded = tmp_path / "download.png"
        download.value.save_as(downloaded)
    text = png_text(downloaded)
    params = json.loads(text["parameters"])
    assert params["prompt"] == "a Baroque painting" and params["steps"] == 4
    assert text["command"].startswith("python diffusion.py --seed ")
    assert "--prompt 'a Baroque painting'" in text["command"]
    assert downloaded.read_bytes() == (outdir / f"{params['seed']:05d}.png").read_bytes()
    if os.environ.get("STUDIO_SCREENSHOT"):  # docs/studio.png is made this way, in 256 colours to stay small
        Image.open(tmp_path / "studio.png").convert("RGB").quantize(256).save(os.environ["STUDIO_SCREENSHOT"])


@needs_chromium
def test_browser_more_like_this_sends_a_painting_to_variations(like_studio):
    url, outdir = like_studio
    first = diffusion.next_image_index(outdir)
    with chromium_page(url) as (page, expect):
        page.get_by_label("steps (0 = the sampler's default)").first.fill("2")
        click_generate_and_wait(page, expect).nth(1).click()  # paintings first .. first + 3; select the second
        page.get_by_role("button", name="More like this").first.click()
        page.get_by_role("button", name="Variations", exact=True).click()  # found only on the Variations tab
        expect(page.locator("#variations-gallery img")).to_have_count(4, timeout=120_000)
    assert same_painting(outdir / f"like-{first + 4:05d}.png", outdir / f"{first + 1:05d}.png")
    params = json.loads(png_text(outdir / f"{first + 4:05d}.png")["parameters"])
    assert len(params["like"]) == 1 and params["strength"] == diffusion.LIKE_STRENGTH  # the page's default is -h's


def test_variations_of_one_painting_and_a_blend_regenerate_from_their_pngs(like_studio, embedded, tmp_path,
                                                                          monkeypatch):
    url, outdir = like_studio
    client = gradio_client.Client(url, download_files=str(tmp_path / "downloads"), verbose=False)
    named = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert [f"{p['parameter_name']} {p['component']}" for p in named["/variations"]["parameters"]] == VARIATIONS
    a, b = (gradio_client.handle_file(str(embedded[0] / f"{i:08d}.png")) for i in (1, 2))
    one = images_of(client.predict(a, None, 0.5, 0.6, "", "", 7, 1, 3, 3.0, "ddim", api_name="/variations"))
    blend = images_of(client.predict(a, b, 0.3, 1, "", "", 7, 1, 3, 3.0, "ddim", api_name="/variations"))
    assert not np.array_equal(pixels(one[0]), pixels(blend[0]))  # the tiny model's embedding has a small say
    monkeypatch.chdir(outdir.parent)  # the commands name the kept paintings relative to where the studio runs
    for (path,), likes, mix, strength in ((one, 1, None, 0.6), (blend, 2, 0.3, 1)):
        params = json.loads(png_text(path)["parameters"])
        assert len(params["like"]) == likes and params["mix"] == mix and params["strength"] == strength
        assert all(Path(like).parent == Path(outdir.name) and Path(like).is_file() for like in params["like"])
        (again,) = regenerate(png_text(path)["command"], tmp_path / f"again{likes}")
        assert same_painting(again, path)


def test_bench_studio_section_reports_start_up_and_click_times(tiny_studio, tmp_path):
    import bench

    out = tmp_path / "bench.json"
    assert bench.main(["--sections", "studio", "--studio_unet", str(tiny_studio[3]), "--repeats", "1",
                       "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [row["what"].split(": ")[1] for row in rows] == [
        "start to page served", "first Generate click to 4 images (defaults)", "later clicks to 4 images, median of 1"]
    assert all(0 < row["seconds"] < float("inf") for row in rows)
