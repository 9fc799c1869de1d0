"""Write tiny, randomly initialised scorers for evaluate.py: a CLIP model and a DINO-shaped ViT, with processors.

So that evaluate.py can be tried offline, on the offline demo's run, where facebook/dino-vits16 and
openai/clip-vit-base-patch32 cannot be downloaded. Their scores mean nothing (the weights are random); the
folders are laid out as a user's local copies of the real scorers are, so evaluate.py reads them the same way.

    python examples/make_tiny_scorers.py OUT_DIR [--tokenizer examples/tiny_world_model/tokenizer]
    python evaluate.py ... --dino_model OUT_DIR/dino --clip_model OUT_DIR/clip

or, from Python, ``make_tiny_scorers(out_dir, tokenizer_dir) -> (dino_dir, clip_dir)``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

TINY_WORLD_TOKENIZER = Path(__file__).resolve().parent / "tiny_world_model" / "tokenizer"


def make_tiny_scorers(folder, tokenizer_dir=TINY_WORLD_TOKENIZER):
    """Random CLIP and DINO-shaped ViT models with their processors, saved in folder/clip and folder/dino.

    CLIP reads prompts with the CLIP tokenizer in tokenizer_dir (any CLIPTokenizer folder: a tiny model's will do).
    """
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer, ViTConfig,
                              ViTImageProcessor, ViTModel)

    folder = Path(folder)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder / "clip")
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                     crop_size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(folder / "clip")
    torch.manual_seed(0)
    ViTModel(ViTConfig(**vision), add_pooling_layer=False).save_pretrained(folder / "dino")
    # DINO's own normalisation (ImageNet's), as facebook/dino-vits16's processor has it
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.485, 0.456, 0.406],
                      image_std=[0.229, 0.224, 0.225]).save_pretrained(folder / "dino")
    return folder / "dino", folder / "clip"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--tokenizer", type=Path, default=TINY_WORLD_TOKENIZER,
                        help="a CLIPTokenizer folder for the CLIP scorer (default: the tiny world model's)")
    args = parser.parse_args(argv)
    dino, clip = make_tiny_scorers(args.out_dir, args.tokenizer)
    print(f"--dino_model {dino} --clip_model {clip}")


if __name__ == "__main__":
    main()
