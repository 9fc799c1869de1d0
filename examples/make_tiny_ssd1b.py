"""Write a tiny, randomly initialised SSD-1B-shaped diffusers pipeline folder.

For tests and the offline demo; never for quality. The folder has the layout and
the architectural quirks of segmind/SSD-1B (attention-free mid block, uneven
transformer depths, two CLIP text encoders, text_time added conditioning, an
fp16-fix style VAE) but every width is shrunk so that building it takes a few
seconds and a 64x64 generation well under one on a laptop CPU. Its images are
noise.

    python examples/make_tiny_ssd1b.py OUT_DIR [--seed 0]

or, from Python, ``make_tiny_ssd1b(out_dir, seed=0) -> Path``. Load the result
with ``StableDiffusionXLPipeline.from_pretrained(out_dir)`` or any component with
``from_pretrained(out_dir, subfolder=...)``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

# SDXL base's scheduler_config.json, verbatim, so this script does not need the
# shared config folder at run time. The DDPM-only keys (clip_sample, set_alpha_to_one, ...)
# are kept on purpose: a trainer's DDPMScheduler.from_pretrained(..., subfolder="scheduler")
# then gets the real values instead of DDPM's defaults (clip_sample=True).
SCHEDULER_CONFIG = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

# Whole-word merges for the prompts the tests and demo use, so that
# "a photo of sks dog" becomes five word tokens rather than twelve characters.
MERGED_WORDS = ("photo", "of", "sks", "dog", "the", "in", "on", "beach", "picture")

TEXT_HIDDEN = 32  # text_encoder (CLIP-L in the real model: 768)
TEXT_2_HIDDEN = 64  # text_encoder_2 (OpenCLIP bigG: 1280)
TEXT_2_PROJECTION = 32  # pooled embedding fed to the UNet's added conditioning (1280)
TIME_EMBED_DIM = 8  # per micro-conditioning id (256)
MAX_TOKENS = 77


def byte_alphabet() -> list[str]:
    """CLIP's byte-to-unicode table, in CLIP's order ("!" first, so it gets id 0 as in the real vocabulary)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def vocabulary_and_merges(words=MERGED_WORDS) -> tuple[dict[str, int], list[str]]:
    # Every byte, plain and word-final, so no input ever needs the unknown token.
    alphabet = byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    for word in words:
        pieces = [*word[:-1], word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            if f"{merged} {piece}" not in merges:
                merges.append(f"{merged} {piece}")
            merged += piece
            if merged not in tokens:
                tokens.append(merged)
    # Special tokens last, as in CLIP: the text encoders' legacy pooling (eos_token_id == 2 in
    # SDXL's configs) takes the hidden state at argmax(input_ids), which must be <|endoftext|>.
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def write_vocab_files(folder: Path, words=MERGED_WORDS) -> None:
    vocab, merges = vocabulary_and_merges(words)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def make_tokenizers(words=MERGED_WORDS) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    # Loading from vocab.json + merges.txt is the one construction path that transformers 4.x
    # (slow tokenizer: vocab_file, merges_file) and 5.x (vocab dict, merges as tuples) share.
    with tempfile.TemporaryDirectory() as tmp:
        write_vocab_files(Path(tmp), words)
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=MAX_TOKENS, pad_token="<|endoftext|>")
        tokenizer_2 = CLIPTokenizer.from_pretrained(tmp, model_max_length=MAX_TOKENS, pad_token="!")
    return tokenizer, tokenizer_2


def text_config(vocab_size: int, hidden: int, hidden_act: str, projection_dim: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        hidden_act=hidden_act,
        projection_dim=projection_dim,
        # SDXL's values, kept so the same (legacy) pooling code path runs as with the real encoders.
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )


def make_text_encoders(vocab_size: int, seed: int) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_config(vocab_size, TEXT_HIDDEN, "quick_gelu", TEXT_HIDDEN))
    torch.manual_seed(seed)
    text_encoder_2 = CLIPTextModelWithProjection(text_config(vocab_size, TEXT_2_HIDDEN, "gelu", TEXT_2_PROJECTION))
    return text_encoder, text_encoder_2


def make_unet(seed: int, widths=(16, 32, 32)) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        # SSD-1B's distillation removed the mid block's attention; code that walks
        # unet.mid_block.attentions must cope with its absence.
        mid_block_type="UNetMidBlock2D",
        block_out_channels=widths,
        layers_per_block=2,
        norm_num_groups=8,
        # Number of heads per block (diffusers' historical naming): two 16-wide heads.
        attention_head_dim=(2, 2, 2),
        # Uneven depths like SSD-1B's [[1],[2,2],[4,4]] / [[4,4,10],[2,1,1],1], so LoRA code
        # cannot assume every attention block has the same number of transformer layers.
        transformer_layers_per_block=[[1], [1, 2], [2, 1]],
        reverse_transformer_layers_per_block=[[2, 1, 1], [1, 2, 1], 1],
        use_linear_projection=True,
        # Penultimate hidden states of both text encoders, concatenated.
        cross_attention_dim=TEXT_HIDDEN + TEXT_2_HIDDEN,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        # Pooled text_encoder_2 embedding + 6 micro-conditioning ids (original size, crop, target size).
        projection_class_embeddings_input_dim=TEXT_2_PROJECTION + 6 * TIME_EMBED_DIM,
    )


def make_vae(seed: int, widths=(8, 8, 16, 16)) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        # Four blocks, so three downsamplings: the real 8x VAE scale factor.
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=widths,
        layers_per_block=2,
        norm_num_groups=4,
        latent_channels=4,
        sample_size=64,
        # sdxl-vae-fp16-fix's values: no fp32 upcast needed when decoding in half precision.
        scaling_factor=0.13025,
        force_upcast=False,
    )


def add_text_model_prefix(weights: Path) -> None:
    """Store CLIPTextModel weights under "text_model.*", as in SDXL's own checkpoint.

    transformers 5 flattened CLIPTextModel and saves bare keys, which 4.x silently ignores
    (random weights, one warning); 5.x still reads the prefixed keys, so this layout loads in both
    and exercises the same key conversion as loading the real SSD-1B does.
    """
    state = load_file(weights)
    if all(key.startswith("text_model.") for key in state):
        return
    save_file({f"text_model.{key}": value for key, value in state.items()}, weights, metadata={"format": "pt"})


def save_pipeline(out_dir: str | Path, vae, text_encoders, tokenizers, unet, words=MERGED_WORDS) -> Path:
    """Write the parts as an SDXL pipeline folder that both transformers 4.x and 5.x load."""
    out_dir = Path(out_dir)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoders[0],
        text_encoder_2=text_encoders[1],
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=unet,
        # from_config, not the constructor: it keeps the keys Euler does not take in the saved config.
        scheduler=EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG),
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    # transformers 5 saves only tokenizer.json; the vocabulary files keep the folder loadable by 4.x.
    write_vocab_files(out_dir / "tokenizer", words)
    write_vocab_files(out_dir / "tokenizer_2", words)
    add_text_model_prefix(out_dir / "text_encoder" / "model.safetensors")
    return out_dir


def make_tiny_ssd1b(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline folder to out_dir and return its path."""
    tokenizers = make_tokenizers()
    text_encoders = make_text_encoders(len(tokenizers[0]), seed)
    return save_pipeline(out_dir, make_vae(seed), text_encoders, tokenizers, make_unet(seed))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder to write the pipeline into")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    args = parser.parse_args(argv)
    print(make_tiny_ssd1b(args.out_dir, seed=args.seed))


if __name__ == "__main__":
    main()
