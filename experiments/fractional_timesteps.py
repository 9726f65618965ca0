"""Trained on integer timesteps, asked about fractional ones: does it matter?

trainer.py draws integer training timesteps t in {0..999}; Karras-spaced sampling (dpmpp-2m's default) asks the UNet
about fractional ones, e.g. 712.38. The UNet sees t only through a sinusoidal embedding, which is smooth in t. This
measures whether its answers are too: on held-out paintings, with the same noise for each comparison, the denoising
error (eps MSE) at each timestep of the 20-step Karras schedule is set against the errors at its two integer
neighbours, linearly interpolated. A network that had learnt something only at integers would do worse in between.

    python experiments/fractional_timesteps.py --out results/current/fractional_timesteps_s13439.json
"""
import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpoints import atomic_write_json  # noqa: E402
from diffusion import load_diffusion_model  # noqa: E402
from images import ImageSource, image_to_tensor  # noqa: E402
from samplers import sampling_timesteps  # noqa: E402
from schedule import q_sample  # noqa: E402


@torch.no_grad()
def test_latents(pipeline, data, count, resolution):
    source = ImageSource(data, "test", "image")
    images = torch.cat([image_to_tensor(source.image(i), resolution)[None] for i in range(count)])
    return torch.cat([pipeline.encode(batch) for batch in images.split(32)])  # N x C x h x w, scaled


@torch.no_grad()
def eps_error(pipeline, latents, noise, t):
    """Mean squared error of the predicted noise at timestep t (a float), over all latents."""
    alpha_bar = pipeline.schedule.alpha_bar(torch.full((len(latents),), t, dtype=torch.float64))
    x_t = q_sample(latents, noise, alpha_bar)
    errors = [(pipeline.unet(x, torch.full((len(x),), t)) - n).pow(2).mean().item() * len(x)
              for x, n in zip(x_t.split(64), noise.split(64))]
    return sum(errors) / len(latents)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/unet-uncond", help="diffusion checkpoint")
    parser.add_argument("--data", default="../shared/wikiart-mini", help="dataset with a test split")
    parser.add_argument("--count", type=int, default=256, help="test paintings")
    parser.add_argument("--steps", type=int, default=20, help="Karras steps whose timesteps are checked")
    parser.add_argument("--out", required=True, help="JSON written here")
    args = parser.parse_args()
    torch.manual_seed(0)
    pipeline = load_diffusion_model(args.model, "cpu", channels_last=False)
    latents = test_latents(pipeline, args.data, args.count, pipeline.latent_shape[1] * 4)
    rows = []
    for t in sampling_timesteps(pipeline.schedule, args.steps, karras=True).tolist():
        low, high = math.floor(t), min(math.floor(t) + 1, pipeline.schedule.num_train_timesteps - 1)
        if low == t or low == high:
            continue
        noise = torch.randn_like(latents)
        at_low, at_t, at_high = (eps_error(pipeline, latents, noise, s) for s in (low, t, high))
        between = at_low + (t - low) * (at_high - at_low)
        rows.append({"t": t, "error_at_t": at_t, "interpolated_from_integers": between,
                     "relative_excess": at_t / between - 1})
        print(f"t {t:8.3f}: eps MSE {at_t:.5f}, from integers {between:.5f} ({rows[-1]['relative_excess']:+.2%})")
    worst = max(abs(r["relative_excess"]) for r in rows)
    summary = {"model": args.model, "paintings": args.count, "karras_steps": args.steps, "rows": rows,
               "largest_relative_difference": worst}
    atomic_write_json(args.out, summary)
    print(f"largest relative difference {worst:.3%} over {len(rows)} fractional timesteps; wrote {args.out}")


if __name__ == "__main__":
    main()
