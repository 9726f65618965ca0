"""Memorisation and variation checks for an embedding-conditioned model, in its own image-embedding space.

Memorisation: the distance from each generated painting to its nearest training painting, against the same for
held-out test paintings. Samples that copied training paintings would sit much closer than test paintings do (ratio
well below 1). Variations: for test paintings, how close `--like` variations stay to their source, against
unrelated samples of the same model (ratio well below 1: recognisably related).

    python experiments/embedding_checks.py --model runs/ab/embed --samples runs/eval/ab-embed \\
        --embeddings runs/embeddings --out results/current/embedding_checks.json
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpoints import atomic_write_json  # noqa: E402
from diffusion import load_diffusion_model  # noqa: E402
from image_embedding import load_embedder, load_embedding_cache  # noqa: E402
from images import ImageSource, image_to_tensor  # noqa: E402


@torch.no_grad()
def embed_source(embedder, source, rows, resolution, batch_size=64):
    """Embeddings len(rows) x D of an ImageSource's rows (centre crops at `resolution`)."""
    chunks = []
    for start in range(0, len(rows), batch_size):
        images = torch.cat([image_to_tensor(source.image(i), resolution)[None] for i in rows[start:start + batch_size]])
        chunks.append(embedder(images))
    return torch.cat(chunks)


def nearest_distance(queries, references, exclude_self=False):
    """Each query's Euclidean distance to its nearest reference (N)."""
    distances = torch.cdist(queries, references)
    if exclude_self:
        distances.fill_diagonal_(float("inf"))
    return distances.min(dim=1).values


@torch.no_grad()
def variation_distances(pipeline, embedder, sources, per_source, seed, steps):
    """(distance of each variation to its source, distance of each variation to the other sources), embeddings."""
    source_embeds = embedder(sources)  # S x D
    own, others = [], []
    for i in range(len(sources)):
        images = pipeline.generate(per_source, seed + i * per_source, steps=steps, progress=False,
                                   image_embeds=source_embeds[i:i + 1].expand(per_source, -1))
        variation_embeds = embedder(images)  # per_source x D
        distances = torch.cdist(variation_embeds, source_embeds)  # per_source x S
        own.append(distances[:, i])
        others.append(torch.cat([distances[:, :i], distances[:, i + 1:]], 1).flatten())
    return torch.cat(own), torch.cat(others)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="embedding-conditioned diffusion checkpoint")
    parser.add_argument("--samples", required=True, help="folder of its unprompted samples (evaluate.py --fake)")
    parser.add_argument("--embeddings", required=True, help="image_embedding.py folder of the training paintings")
    parser.add_argument("--data", default="../shared/wikiart-mini", help="dataset with a test split")
    parser.add_argument("--sources", type=int, default=16, help="test paintings whose variations are drawn")
    parser.add_argument("--per_source", type=int, default=4, help="variations of each")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps of the variations")
    parser.add_argument("--out", required=True, help="JSON written here")
    args = parser.parse_args()
    embedder = load_embedder(Path(args.embeddings) / "embedder")
    train, _ = load_embedding_cache(Path(args.embeddings) / "cache")
    test = ImageSource(args.data, "test", "image")
    test_embeds = embed_source(embedder, test, list(range(len(test))), 128)
    samples = ImageSource(args.samples)
    sample_embeds = embed_source(embedder, samples, list(range(len(samples))), 128)
    sample_nn, test_nn = nearest_distance(sample_embeds, train), nearest_distance(test_embeds, train)
    pipeline = load_diffusion_model(args.model, "cpu")
    sources = torch.cat([image_to_tensor(test.image(i), 128)[None] for i in range(args.sources)])
    own, others = variation_distances(pipeline, embedder, sources, args.per_source, 0, args.steps)
    unrelated = nearest_distance(sample_embeds[:len(own)], embedder(sources))
    results = {
        "model": args.model, "samples": len(samples), "test_paintings": len(test), "training_paintings": len(train),
        "memorisation": {"median_nearest_train_distance_samples": sample_nn.median().item(),
                         "median_nearest_train_distance_test": test_nn.median().item(),
                         "ratio": (sample_nn.median() / test_nn.median()).item(),
                         "samples_closer_than_the_closest_test_painting": int((sample_nn < test_nn.min()).sum())},
        "variations": {"sources": args.sources, "per_source": args.per_source,
                       "median_distance_to_own_source": own.median().item(),
                       "median_distance_to_other_sources": others.median().item(),
                       "median_unprompted_sample_to_nearest_source": unrelated.median().item(),
                       "ratio_own_to_other": (own.median() / others.median()).item()},
    }
    atomic_write_json(args.out, results)
    print(results)


if __name__ == "__main__":
    main()
