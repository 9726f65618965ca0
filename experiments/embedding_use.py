"""How much an embedding-conditioned UNet uses its image embedding: its noise-prediction loss on cached training
latents at a few timesteps with each painting's own embedding, with another painting's (the batch rolled by one)
and with the null embedding. A model that ignores the embedding scores the three alike.

    python experiments/embedding_use.py --model models/unet-like --latents runs/latents128 \\
        --embeddings runs/embeddings --out results/current/embedding_use_s20539.json
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpoints import atomic_write_json, load_state_dir  # noqa: E402
from diffusion import load_diffusion_model  # noqa: E402
from image_embedding import load_embedding_cache  # noqa: E402


@torch.no_grad()
def embedding_losses(pipeline, latents, embeds, timesteps):
    """{t: {"own", "other", "null": mean eps MSE}} on scaled latents N x C x h x w with their embeddings N x E."""
    others = torch.roll(torch.arange(len(latents)), 1)
    results = {}
    for t in timesteps:
        t_batch = torch.full((len(latents),), t)
        noise = torch.randn_like(latents)
        x_t = pipeline.schedule.q_sample(latents, t_batch, noise)
        results[t] = {}
        for name, image_embed in (("own", embeds), ("other", embeds[others]), ("null", None)):
            with torch.autocast("cpu", torch.bfloat16):
                prediction = pipeline.unet(x_t, t_batch, image_embed=image_embed).float()
            results[t][name] = (prediction - noise).pow(2).mean().item()
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/unet-like", help="embedding-conditioned diffusion checkpoint")
    parser.add_argument("--latents", default="runs/latents128", help="trainer.py's latent cache of the paintings")
    parser.add_argument("--embeddings", default="runs/embeddings", help="image_embedding.py folder of the same rows")
    parser.add_argument("--n", type=int, default=256, help="paintings drawn from the cache")
    parser.add_argument("--timesteps", type=int, nargs="+", default=[100, 300, 500, 700, 900])
    parser.add_argument("--out", required=True, help="JSON written here")
    args = parser.parse_args()
    torch.manual_seed(0)  # before the model is built, so a run is repeatable
    pipeline = load_diffusion_model(args.model, "cpu")
    latents = load_state_dir(args.latents)["latents"][:, 0]  # N x C x h x w, unscaled, not mirrored
    embeds, _ = load_embedding_cache(Path(args.embeddings) / "cache")
    rows = torch.randperm(len(latents))[:args.n]
    losses = embedding_losses(pipeline, latents[rows].float() * pipeline.latent_scale, embeds[rows].float(),
                              args.timesteps)
    for t, row in losses.items():
        print(t, {name: round(value, 5) for name, value in row.items()})
    atomic_write_json(args.out, {"model": args.model, "n": args.n, "losses": losses})


if __name__ == "__main__":
    main()
