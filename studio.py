"""Noise2Art Studio: a local web page that makes paintings with the bundled models (Gradio).

    python studio.py                                # http://127.0.0.1:7860, bundled models, offline
    python studio.py --port 7861 --outdir my_paintings
    python studio.py --unet runs/cond/unet.json     # another diffusion checkpoint
    python studio.py --unet runs/like/unet.json     # one trained with --image_embeddings: a Variations tab too

Tabs Generate, Img2img and Interpolate, and Variations where the model takes image embeddings (trainer.py
--image_embeddings); each is also an API endpoint (/generate, /img2img, /interpolate, /variations) that
gradio_client can call. A callback is thin: it turns its widgets into a diffusion.py command line, parses that with
diffusion.py's own parser (the page refuses what `diffusion.py -h` refuses, with the same message) into the
SamplingRequest the command would draw, and runs diffusion.sample_to_folder on it with the models loaded at start.
So every image lands in --outdir with the PNG text chunks diffusion.py writes, the command that regenerates it among
them, and closing the browser loses nothing.
"""
import argparse
import math
import os
import random
import socket
import time
import urllib.request
from pathlib import Path

import gradio as gr
from PIL import Image

import diffusion
from checkpoints import atomic_write
from cli import ArgumentParser, UserError, check_output_folder, positive_int, run_cli
from devices import pick_device

# The seven WikiArt-mini styles the bundled conditional model was trained on (its captions: "a {style} painting").
STYLES = ("Art Nouveau Modern", "Baroque", "Expressionism", "Impressionism", "Post-Impressionism", "Romanticism",
          "Symbolism")
DEFAULT_CAPTION_TEMPLATE = "a {style} painting"
# The text encoder reads only the first max_text_length (32) tokens, about 150 characters; a page that took any
# length would let a pasted essay look as if it mattered.
MAX_PROMPT_CHARS = 1000
# An upload is cut to the model's 128 px anyway; past this, decoding alone takes seconds and hundreds of MB.
MAX_UPLOAD_PIXELS = 4096 * 4096
ANIMATION_FRAME_MS = 150
# Two cores: one generation already keeps both busy (torch's intra-op threads), so a second one at once would
# only halve the speed of each and double the memory; the queue runs them one after another instead.
CONCURRENCY = 1
QUEUE = dict(concurrency_limit=CONCURRENCY, concurrency_id="sampler")  # every tab's button: one queue slot for all


# ----------------------------------------------------------------------------------------------
# Models: loaded once at start


class Models:
    """The pipelines the studio samples from, loaded once. Bundled: models/unet-uncond for an empty prompt,
    models/unet-cond for a prompt and models/unet-like for variations (as diffusion.py picks them); with --unet,
    that one checkpoint for all. vqgan: a VQGAN to decode with instead of the checkpoints' own (diffusion.py
    --vqgan)."""

    def __init__(self, unet=None, vqgan=None, device="auto", precision="auto"):
        self.unet, self.vqgan, self.device_name, self.precision = unet, vqgan, device, precision
        self.device = pick_device(device)
        paths = [unet] if unet else [diffusion.default_checkpoint(False), diffusion.default_checkpoint(True)]
        if not unet and (diffusion.BUNDLED_MODELS / "unet-like.json").is_file():
            paths.append(diffusion.default_checkpoint(False, like=True))
        self.pipelines = {str(p): self.load(p) for p in paths}

    def load(self, checkpoint):
        pipeline = diffusion.load_diffusion_model(checkpoint, self.device, vqgan_path=self.vqgan,
                                                  bf16=diffusion.use_bf16(self.precision, self.device))
        if pipeline.conditional:
            pipeline.text_encoder  # load the encoder now rather than on the first prompt
        return pipeline

    def flags(self):
        """The diffusion.py flags that load these models as the studio did."""
        flags = ["--device", self.device_name, "--precision", self.precision]
        flags += ["--unet_ckpt_path", str(self.unet)] if self.unet else []
        return flags + (["--vqgan", str(self.vqgan)] if self.vqgan else [])

    def take_image_embeddings(self):
        """Whether the model draws variations of a painting (trained with trainer.py --image_embeddings)."""
        return any(p.unet.image_embed_dim is not None for p in self.pipelines.values())

    def checkpoint(self, prompt, like=False):
        return self.unet or diffusion.default_checkpoint(bool(prompt), like)

    def pick(self, prompt, like=False):
        """(checkpoint, pipeline) for a prompt ("" = unconditional), or for variations (`like`)."""
        checkpoint = self.checkpoint(prompt, like)
        return checkpoint, self.pipelines[str(checkpoint)]

    def caption_template(self):
        """The caption template the conditional model was trained with, for the style presets."""
        for pipeline in self.pipelines.values():
            if pipeline.conditional:
                args = pipeline.config.get("training", {}).get("args", {})
                return args.get("caption_template") or DEFAULT_CAPTION_TEMPLATE
        return None

    def num_train_timesteps(self):
        return min(p.schedule.num_train_timesteps for p in self.pipelines.values())


# ----------------------------------------------------------------------------------------------
# From widgets to a diffusion.py command line, and back to files


def sampling_flags(models, prompt, negative_prompt, seed, steps, guidance_scale, sampler):
    """The diffusion.py flags that every tab shares. steps 0 = the sampler's default; the guidance scale applies
    where the command line applies it (a prompt, a painting to vary)."""
    prompt = check_prompt(prompt, "prompt")
    negative_prompt = check_prompt(negative_prompt, "negative prompt")
    flags = [*models.flags(), "--seed", str(check_seed(seed)), "--sampler", str(sampler), "--guidance_scale",
             str(guidance_scale)]
    flags += ["--steps", str(int(steps))] if steps else []
    flags += ["--prompt", prompt] if prompt else []
    return flags + (["--negative_prompt", negative_prompt] if negative_prompt else [])


def check_prompt(text, what):
    text = (text or "").strip()
    if len(text) > MAX_PROMPT_CHARS:
        raise gr.Error(f"the {what} is {len(text):,} characters; at most {MAX_PROMPT_CHARS:,} (the text encoder reads "
                       f"only its first 32 tokens)")
    return text


def check_seed(seed):
    """A seed as an int; gradio_client can send any JSON value."""
    if isinstance(seed, bool) or not isinstance(seed, (int, float)) or not math.isfinite(seed) or seed != int(seed):
        raise gr.Error(f"the seed must be a whole number, got {seed!r}")
    return int(seed)


def friendly_preprocess(component, message):
    """`component` whose preprocess failure (an upload that is no image, say) is a message on the page rather than a
    server error. It patches the one widget: a subclass of a Gradio component makes Gradio write a .pyi stub beside
    this file at import."""
    preprocess = component.preprocess

    def checked(payload):
        try:
            return preprocess(payload)
        except gr.Error:
            raise
        except (OSError, ValueError) as err:
            raise gr.Error(f"{message}: {err}") from None

    component.preprocess = checked
    return component


def parse_command(flags, outdir):
    """The SamplingRequest diffusion.py makes of the command line `flags`, checked as the command line checks them:
    a value it refuses becomes a message on the page, before any work."""
    try:
        args = diffusion.parse_args([*flags, "--outdir", str(outdir)])
        diffusion.check_args(args)
        return diffusion.sampling_request(args)
    except UserError as err:
        raise gr.Error(str(err).removesuffix(" (see diffusion.py -h)")) from None


def sample(models, request, outdir):
    """diffusion.py's sampling and saving with the loaded model: (image paths, grid path)."""
    checkpoint, pipeline = models.pick(request.prompts and request.prompts[0], like=request.like is not None)
    try:
        return diffusion.sample_to_folder(request, checkpoint, pipeline, outdir)
    except UserError as err:
        raise gr.Error(str(err)) from None


def gallery(paths):
    """Gallery items: each saved PNG (downloads with its text chunks) captioned by its file name."""
    return [(str(p), p.name) for p in paths]


def upload_path(outdir, kind="upload"):
    """Where an upload is kept: beside the images it starts, named after the first of them."""
    return Path(outdir) / f"{kind}-{diffusion.next_image_index(outdir):05d}.png"


def keep_upload(upload, path):
    """An uploaded painting, checked and copied to `path` as PNG, so the images' regenerate command (which names
    it) still works when Gradio's temporary copy is gone."""
    if upload is None:
        raise gr.Error("upload a painting first (JPEG, PNG or WebP)")
    with open_upload(upload) as img:
        if img.width * img.height > MAX_UPLOAD_PIXELS:  # read from the header, before decoding
            raise gr.Error(f"the image is {img.width} x {img.height} ({img.width * img.height / 1e6:.1f} "
                           f"megapixels); at most {MAX_UPLOAD_PIXELS / 1e6:.1f}")
        try:
            img = img.convert("RGB")
        except (OSError, ValueError) as err:
            raise gr.Error(f"cannot decode the upload: {err}") from None
    atomic_write(path, lambda f: img.save(f, format="PNG"))


def open_upload(path):
    try:
        return Image.open(path)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise gr.Error(f"cannot read the upload as an image (JPEG, PNG or WebP): {err}") from None


def save_animation(paths, path):
    """The frames `paths` as a looping animated WebP at `path`."""
    frames = [Image.open(p).convert("RGB") for p in paths]
    atomic_write(path, lambda f: frames[0].save(f, format="WEBP", save_all=True, append_images=frames[1:],
                                                duration=ANIMATION_FRAME_MS, loop=0, lossless=True))
    return path


# ----------------------------------------------------------------------------------------------
# The callbacks: one per tab, each an API endpoint. Arguments in the order the README lists them.


def make_callbacks(models, outdir):
    """generate, img2img, interpolate, variations: widget values -> gallery (and for interpolate a strip and an
    animation). Counts arrive within their sliders' range (Gradio refuses others with a message)."""

    def generate(prompt, negative_prompt, seed, count, steps, guidance_scale, sampler,
                 progress=gr.Progress(track_tqdm=True)):
        flags = sampling_flags(models, prompt, negative_prompt, seed, steps, guidance_scale, sampler)
        request = parse_command([*flags, "--num_images", str(int(count))], outdir)
        return gallery(sample(models, request, outdir)[0])

    def img2img(image, strength, prompt, negative_prompt, seed, count, steps, guidance_scale, sampler,
                progress=gr.Progress(track_tqdm=True)):
        flags = sampling_flags(models, prompt, negative_prompt, seed, steps, guidance_scale, sampler)
        init = upload_path(outdir)
        request = parse_command([*flags, "--num_images", str(int(count)), "--init_image", str(init),
                                 "--strength", str(strength)], outdir)
        keep_upload(image, init)
        return gallery(sample(models, request, outdir)[0])

    def interpolate(seed, seed_to, frames, prompt, negative_prompt, steps, guidance_scale, sampler,
                    progress=gr.Progress(track_tqdm=True)):
        flags = sampling_flags(models, prompt, negative_prompt, seed, steps, guidance_scale, sampler)
        request = parse_command([*flags, "--num_images", str(int(frames)), "--interpolate",
                                 "--interpolate_to", str(check_seed(seed_to))], outdir)
        paths, strip = sample(models, request, outdir)
        animation = save_animation(paths, Path(outdir) / f"interpolation-{paths[0].stem}.webp")
        return gallery(paths), str(strip), str(animation)

    def variations(image, image_b, mix, strength, prompt, negative_prompt, seed, count, steps, guidance_scale,
                   sampler, progress=gr.Progress(track_tqdm=True)):
        """Paintings like `image`, or like a blend of it and `image_b` (mix 0: the first, 1: the second), started
        from the painting (their cross-fade) noised to `strength` (1: pure noise, the embedding alone)."""
        flags = sampling_flags(models, prompt, negative_prompt, seed, steps, guidance_scale, sampler)
        uploads = [image] if image_b is None else [image, image_b]
        likes = [upload_path(outdir, kind) for kind in ("like", "like-b")[:len(uploads)]]
        flags += [arg for path in likes for arg in ("--like", str(path))] + (["--mix", str(mix)] if image_b else [])
        flags += ["--strength", str(strength)]
        request = parse_command([*flags, "--num_images", str(int(count))], outdir)
        for upload, path in zip(uploads, likes):
            keep_upload(upload, path)
        return gallery(sample(models, request, outdir)[0])

    return {"generate": generate, "img2img": img2img, "interpolate": interpolate, "variations": variations}


def random_seed():
    return random.randrange(2**31)


# ----------------------------------------------------------------------------------------------
# The page


def sampling_flag_actions():
    """diffusion.py's sampling flags as argparse actions (choices, defaults), so the widgets follow them."""
    parser = argparse.ArgumentParser()
    diffusion.add_sampling_arguments(parser)
    return {action.dest: action for action in parser._actions}


def seed_widget(label="seed (image i uses seed + i)", value=0):
    """A seed box and its Random button."""
    with gr.Row():
        seed = gr.Number(value=value, step=1, label=label)  # no precision: check_seed, not Gradio, judges it
        gr.Button("Random", scale=0, min_width=80).click(random_seed, None, seed, api_visibility="private")
    return seed


def sampler_widgets(max_steps):
    """steps, guidance scale and sampler, with diffusion.py's flag ranges and defaults."""
    flags = sampling_flag_actions()
    with gr.Row():
        steps = gr.Slider(0, max_steps, value=0, step=1, label="steps (0 = the sampler's default)")
        guidance = gr.Number(value=flags["guidance_scale"].default, minimum=0, label="guidance scale (with a prompt)")
        sampler = gr.Dropdown(list(flags["sampler"].choices), value=flags["sampler"].default, label="sampler")
    return steps, guidance, sampler


def prompt_widgets(template, label="prompt (empty: the unconditional model)"):
    """prompt, style preset (fills the prompt with the model's caption template) and negative prompt; shown only
    where a model takes prompts (template is not None)."""
    with gr.Row(visible=template is not None):
        prompt = gr.Textbox("", label=label, max_length=MAX_PROMPT_CHARS, scale=3)
        style = gr.Dropdown(list(STYLES), value=None, label="style preset", scale=1)
    style.input(lambda name: template.format(style=name), style, prompt, api_visibility="private")
    negative = gr.Textbox("", label="negative prompt", max_length=MAX_PROMPT_CHARS,
                          visible=template is not None)
    return prompt, negative


def painting_upload(label):
    """An upload passed on as a file path, any mode (image_mode=None: Gradio would otherwise decode and convert a
    non-RGB image, however large, before keep_upload could refuse it)."""
    return friendly_preprocess(gr.Image(type="filepath", image_mode=None, label=label),
                               "cannot read the upload as an image (JPEG, PNG or WebP)")


def paintings_gallery(label="paintings", columns=4, **options):
    return gr.Gallery(label=label, columns=columns, buttons=["download"], **options)


def generate_tab(callback, template, max_steps, max_images):
    prompt, negative = prompt_widgets(template)
    count = gr.Slider(1, max_images, value=4, step=1, label="count")
    seed = seed_widget()
    steps, guidance, sampler = sampler_widgets(max_steps)
    button = gr.Button("Generate", variant="primary")
    output = paintings_gallery(elem_id="generate-gallery")
    button.click(callback, [prompt, negative, seed, count, steps, guidance, sampler], output, api_name="generate",
                 **QUEUE)
    return output


def img2img_tab(callback, template, max_steps, max_images):
    image = painting_upload("painting (JPEG, PNG or WebP, any size)")
    strength = gr.Slider(0, 1, value=0.75, step=0.01, label="strength (1 = start from pure noise)")
    prompt, negative = prompt_widgets(template, "prompt (optional)")
    count = gr.Slider(1, max_images, value=4, step=1, label="count")
    seed = seed_widget()
    steps, guidance, sampler = sampler_widgets(max_steps)
    button = gr.Button("Img2img", variant="primary")
    output = paintings_gallery()
    button.click(callback, [image, strength, prompt, negative, seed, count, steps, guidance, sampler], output,
                 api_name="img2img", **QUEUE)
    return output


def interpolate_tab(callback, template, max_steps, max_images):
    seed, seed_to = seed_widget("from seed"), seed_widget("to seed", value=1)
    frames = gr.Slider(2, max_images, value=8, step=1, label="frames")
    prompt, negative = prompt_widgets(template, "prompt (optional, the same for every frame)")
    steps, guidance, sampler = sampler_widgets(max_steps)
    button = gr.Button("Interpolate", variant="primary")
    output = paintings_gallery("frames", columns=8)
    with gr.Row():
        strip = gr.Image(label="strip", type="filepath")
        animation = gr.Image(label="animation (WebP)", type="filepath")
    button.click(callback, [seed, seed_to, frames, prompt, negative, steps, guidance, sampler],
                 [output, strip, animation], api_name="interpolate", **QUEUE)
    return output


def variations_tab(callback, template, max_steps, max_images):
    """Returns (the first painting's input, the gallery), for the other tabs' "More like this"."""
    with gr.Row():
        image = painting_upload("painting to vary (or pick one in a gallery: More like this)")
        image_b = painting_upload("optional second painting, to blend")
    mix = gr.Slider(0, 1, value=0.5, step=0.05, label="mix (with two paintings: 0 = the first, 1 = the second)")
    strength = gr.Slider(0.01, 1, value=diffusion.LIKE_STRENGTH, step=0.01,
                         label="strength (lower keeps more of the painting; 1 = from pure noise, its embedding alone)")
    prompt, negative = prompt_widgets(template, "prompt (optional)")
    count = gr.Slider(1, max_images, value=4, step=1, label="count")
    seed = seed_widget()
    steps, guidance, sampler = sampler_widgets(max_steps)
    button = gr.Button("Variations", variant="primary")
    output = paintings_gallery(elem_id="variations-gallery")
    button.click(callback, [image, image_b, mix, strength, prompt, negative, seed, count, steps, guidance, sampler],
                 output, api_name="variations", **QUEUE)
    return image, output


def selected_painting(selection: gr.SelectData):
    return selection.value["image"]["path"]


def to_variations(path):
    if path is None:
        raise gr.Error("select a painting in the gallery first")
    return path, gr.Tabs(selected="variations")


def more_like_this(gallery, button, like_image, tabs):
    """`button` sends the painting selected in `gallery` to the Variations tab."""
    selected = gr.State(None)
    gallery.select(selected_painting, None, selected, api_visibility="private")
    button.click(to_variations, selected, [like_image, tabs], api_visibility="private")


def build_app(models, outdir, max_images=16):
    """The Blocks page: tabs in the order a person works, each button an API endpoint of the tab's name. The
    Variations tab (/variations) is there where the model takes image embeddings."""
    callbacks = make_callbacks(models, outdir)
    widgets = (models.caption_template(), models.num_train_timesteps(), max_images)
    variations = models.take_image_embeddings()
    with gr.Blocks(title="Noise2Art Studio", analytics_enabled=False) as app:
        gr.Markdown(f"# Noise2Art Studio\nEvery painting is also saved in `{outdir}`, with the command that "
                    f"regenerates it in its PNG text.")
        with gr.Tabs() as tabs:
            senders = []  # (a gallery, its More like this button)
            for name, tab in [("Generate", generate_tab), ("Img2img", img2img_tab), ("Interpolate", interpolate_tab)]:
                with gr.Tab(name, id=name.lower()):
                    gallery = tab(callbacks[name.lower()], *widgets)
                    if variations:
                        senders.append((gallery, gr.Button("More like this", size="sm")))
            if variations:
                with gr.Tab("Variations", id="variations"):
                    like_image, gallery = variations_tab(callbacks["variations"], *widgets)
                    senders.append((gallery, gr.Button("More like this", size="sm")))
                for gallery, button in senders:
                    more_like_this(gallery, button, like_image, tabs)
    return app.queue(default_concurrency_limit=CONCURRENCY)


# ----------------------------------------------------------------------------------------------
# Command line


def free_port(host="127.0.0.1"):
    """A port nothing listens on now (for the tests and bench.py, which start servers)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_until_served(url, process, timeout=120):
    """Poll `url` until the studio started as `process` (a subprocess.Popen) answers; a UserError if it exits
    first or `timeout` seconds pass. For the tests and bench.py, which start a server and wait for it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise UserError(f"the studio exited with status {process.returncode} before serving {url}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(0.2)
    raise UserError(f"the studio did not serve {url} within {timeout} s")


def parse_args(argv):
    parser = ArgumentParser(__file__, description="Serve Noise2Art Studio, a local web page that makes paintings.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve on (default: this machine only; 0.0.0.0 opens it to the network)")
    parser.add_argument("--port", type=positive_int, default=7860, help="port to serve on")
    parser.add_argument("--outdir", default="studio_outputs",
                        help="folder where every painting is saved, as diffusion.py saves them")
    parser.add_argument("--unet", default=None,
                        help="diffusion checkpoint for every tab (default: the bundled models/unet-uncond for an empty "
                             "prompt, models/unet-cond for a prompt)")
    parser.add_argument("--vqgan", default=None,
                        help="decode with this VQGAN instead of the checkpoints' own (as diffusion.py --vqgan)")
    parser.add_argument("--max_images", type=positive_int, default=16, help="most images one click makes")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="as diffusion.py --precision")
    return parser.parse_args(argv)


def check_port(host, port):
    """Before the models load: the address must be free to serve on."""
    try:
        with socket.socket() as sock:
            sock.bind((host, port))
    except OSError as err:
        raise UserError(f"cannot serve on {host}:{port} ({err.strerror}): pick another --port or --host") from None


def main(argv=None):
    args = parse_args(argv)
    outdir = check_output_folder(args.outdir, "--outdir")
    check_port(args.host, args.port)
    outdir.mkdir(parents=True, exist_ok=True)
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    models = Models(args.unet, args.vqgan, args.device, args.precision)
    app = build_app(models, outdir, args.max_images)
    print(f"Noise2Art Studio: http://{args.host}:{args.port} (saving to {outdir})", flush=True)
    app.launch(server_name=args.host, server_port=args.port, share=False, ssr_mode=False, mcp_server=False,
               pwa=False, show_error=False, quiet=True, allowed_paths=[str(outdir.resolve())])
    return 0


if __name__ == "__main__":
    run_cli(main)
