"""How related `--like` variations are to their source, by where they start: from pure noise (strength 1, the
image embedding alone, DALL-E 2's variations) or from the source itself noised to a level (SDEdit, strength < 1),
each with the source's embedding and, as the control, with the null embedding (img2img alone).

For each setting, over test paintings: the median distance of a variation to its own source against its distance to
the other sources (ratio well below 1: recognisably related), in two spaces: the model's image embedding (Lite2)
and 16 x 16 colour thumbnails (composition and palette, no ImageNet network). Diversity: the median distance between
two variations of one source against that between variations of different sources (near 0: copies of each other).

    python experiments/variation_strength.py --model models/unet-like \\
        --out results/current/variation_strength_s15139.json
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpoints import atomic_write_json  # noqa: E402
from diffusion import UNPROMPTED_STEPS, load_diffusion_model  # noqa: E402
from images import ImageSource, image_to_tensor  # noqa: E402


def thumbnails(images):
    """Images B x 3 x H x W in [-1, 1] -> B x 768: 16 x 16 colour thumbnails."""
    return F.interpolate(images, size=16, mode="bilinear", antialias=True).flatten(1)


def relatedness(variations, sources):
    """variations S x V x d, sources S x d -> (median own-source distance / median other-source distance,
    median distance within a source's variations / median distance across sources' variations)."""
    num_sources, per_source = variations.shape[:2]
    to_sources = torch.cdist(variations.flatten(0, 1), sources).view(num_sources, per_source, num_sources)
    own_mask = torch.eye(num_sources, dtype=torch.bool)[:, None, :].expand_as(to_sources)
    flat = variations.flatten(0, 1)
    pairwise = torch.cdist(flat, flat)
    same = torch.block_diag(*[torch.ones(per_source, per_source)] * num_sources).bool()
    within = pairwise[same & ~torch.eye(len(flat), dtype=torch.bool)]
    return {"own_to_other": (to_sources[own_mask].median() / to_sources[~own_mask].median()).item(),
            "within_to_across": (within.median() / pairwise[~same].median()).item()}


@torch.no_grad()
def variations(pipeline, sources, embeds, per_source, strength, guidance_scale, steps, seed):
    """S x V images: per_source variations of each source from `strength` (1: pure noise), conditioned on `embeds`
    (S x E; the null embedding for img2img alone)."""
    images = []
    for i, source in enumerate(sources):
        images.append(pipeline.generate(
            per_source, seed + i * per_source, steps=steps, guidance_scale=guidance_scale, progress=False,
            init_images=None if strength == 1 else source[None].expand(per_source, -1, -1, -1),
            strength=None if strength == 1 else strength,
            image_embeds=embeds[i:i + 1].expand(per_source, -1)))
    return torch.stack(images)  # S x V x 3 x H x W


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/unet-like", help="embedding-conditioned diffusion checkpoint")
    parser.add_argument("--data", default="../shared/wikiart-mini", help="dataset with a test split")
    parser.add_argument("--sources", type=int, default=16, help="test paintings whose variations are drawn")
    parser.add_argument("--per_source", type=int, default=4, help="variations of each")
    parser.add_argument("--strengths", type=float, nargs="+", default=[1.0, 0.9, 0.8, 0.7, 0.6])
    parser.add_argument("--guidance_scale", type=float, default=3.0, help="embedding guidance")
    parser.add_argument("--out", required=True, help="JSON written here")
    args = parser.parse_args()
    pipeline = load_diffusion_model(args.model, "cpu")
    size = pipeline.latent_shape[1] * pipeline.vqgan.downsample_factor
    test = ImageSource(args.data, "test", "image")
    step = len(test) // args.sources  # spread over the test split's styles
    sources = torch.cat([image_to_tensor(test.image(i * step), size)[None] for i in range(args.sources)])
    embeds = pipeline.embed_images(sources)
    source_embeds, source_thumbs = embeds, thumbnails(sources)
    rows = []
    for strength in args.strengths:
        null = pipeline.unet.null_image_embed.detach().float()[None].expand_as(embeds)
        for conditioning, cond_embeds in (("embedding", embeds), ("null", null)):
            images = variations(pipeline, sources, cond_embeds, args.per_source, strength, args.guidance_scale,
                                UNPROMPTED_STEPS["dpmpp-2m"], seed=0)
            flat = images.flatten(0, 1)
            row = {"strength": strength, "conditioning": conditioning,
                   "embedding": relatedness(pipeline.embed_images(flat).view(*images.shape[:2], -1), source_embeds),
                   "thumbnail": relatedness(thumbnails(flat).view(*images.shape[:2], -1), source_thumbs)}
            print(row, flush=True)
            rows.append(row)
    atomic_write_json(args.out, {"model": args.model, "sources": args.sources, "per_source": args.per_source,
                                 "guidance_scale": args.guidance_scale, "steps": UNPROMPTED_STEPS["dpmpp-2m"],
                                 "sampler": "dpmpp-2m", "rows": rows})


if __name__ == "__main__":
    main()
