"""Write a full-size SSD-1B diffusers folder with random weights, for speed and memory benchmarks.

    python benchmarks/make_full_ssd1b.py OUT_DIR [--dtype fp16|bf16|fp32] [--device cuda|cpu] [--seed 0]
    python benchmarks/make_full_ssd1b.py --check     # build every part on the meta device and count parameters

The architecture comes from benchmarks/ssd1b/ (SSD-1B's UNet and two CLIP text encoders, the fp16-fix VAE,
SDXL's scheduler); see the README there. A training step costs the same with random weights as with real
ones, so the folder is good for timings and memory, never for images: they are noise. The tokenizers are the
small ones of examples/make_tiny_ssd1b.py, since the real vocabularies are not data we have; tokenisation
costs nothing next to a step, and the trainer caches the prompt embeddings anyway.

OUT_DIR loads like segmind/SSD-1B: --pretrained_model_name_or_path OUT_DIR, and OUT_DIR/vae as
--pretrained_vae_model_name_or_path. In fp16 it takes about 4.5 GB of disk (2.7 GB of it the UNet).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

# examples/ is no package; its tiny model already knows how to build a small CLIP tokenizer pair
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from make_tiny_ssd1b import add_text_model_prefix, make_tokenizers, write_vocab_files  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "ssd1b"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# What each part of segmind/SSD-1B holds (the UNet count is the one its published weight sizes imply).
EXPECTED_PARAMETERS = {"unet": 1_331_334_404, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840,
                       "vae": 83_653_863}


def read_config(name: str) -> dict:
    return json.loads((CONFIGS / name).read_text())


def build_unet(device) -> UNet2DConditionModel:
    with torch.device(device):
        return UNet2DConditionModel.from_config(read_config("unet_config.json"))


def build_vae(device) -> AutoencoderKL:
    with torch.device(device):
        return AutoencoderKL.from_config(read_config("vae_fp16_fix_config.json"))


def build_text_encoders(device) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    # vocab_size stays the real 49,408 although the small tokenizer uses only its first few hundred ids: the
    # embedding tables then hold exactly SSD-1B's parameters and memory. Pooling still finds the end token,
    # as argmax(input_ids), because make_tokenizers() puts <|endoftext|> last.
    with torch.device(device):
        return (CLIPTextModel(CLIPTextConfig.from_dict(read_config("text_encoder_config.json"))),
                CLIPTextModelWithProjection(CLIPTextConfig.from_dict(read_config("text_encoder_2_config.json"))))


def check_tokenizers(tokenizers, text_encoders) -> None:
    """The small tokenizers must behave as SSD-1B's do where the trainer can tell: 77 tokens, the same padding,
    and ids the text encoders can embed."""
    for tokenizer, name, text_encoder in zip(tokenizers, ["tokenizer_config.json", "tokenizer_2_config.json"],
                                             text_encoders):
        config = read_config(name)
        assert tokenizer.model_max_length == config["model_max_length"], name
        assert tokenizer.pad_token == config["pad_token"], name  # tokenizer_2 pads with "!"
        assert len(tokenizer) <= text_encoder.config.vocab_size, name
        assert tokenizer.convert_tokens_to_ids("<|endoftext|>") == len(tokenizer) - 1, name


def count_parameters() -> dict[str, int]:
    """Every part built on the meta device: no memory and no time, and the same parameter count as real weights."""
    text_encoder, text_encoder_2 = build_text_encoders("meta")
    check_tokenizers(make_tokenizers(), (text_encoder, text_encoder_2))
    parts = {"unet": build_unet("meta"), "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
             "vae": build_vae("meta")}
    return {name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()}


def check() -> bool:
    counts = count_parameters()
    for name, count in counts.items():
        verdict = "ok" if count == EXPECTED_PARAMETERS[name] else f"expected {EXPECTED_PARAMETERS[name]:,}"
        print(f"{name:15s} {count:>14,}  {verdict}")
    print(f"{'total':15s} {sum(counts.values()):>14,}")
    return counts == EXPECTED_PARAMETERS


def build_pipeline(dtype, device, seed) -> StableDiffusionXLPipeline:
    """Each part is made with its own default initialisation (finite, sanely scaled activations, so the
    trainer's nan guards never fire) and cast at once, so fp32 copies never pile up: the peak is the UNet's
    5.3 GB in fp32 beside the rest in the target dtype (7.5 GB RSS measured on a CPU)."""
    torch.manual_seed(seed)
    text_encoder, text_encoder_2 = (m.to(dtype) for m in build_text_encoders(device))
    tokenizer, tokenizer_2 = make_tokenizers()
    check_tokenizers((tokenizer, tokenizer_2), (text_encoder, text_encoder_2))
    return StableDiffusionXLPipeline(
        vae=build_vae(device).to(dtype), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=build_unet(device).to(dtype),
        # from_config keeps the DDPM keys (clip_sample, ...) that the trainer's DDPMScheduler reads
        scheduler=EulerDiscreteScheduler.from_config(read_config("scheduler_config.json")))


def make_full_ssd1b(out_dir: str | Path, dtype: str = "fp16", device: str = "cpu", seed: int = 0) -> Path:
    """Write the full-size folder to out_dir and return its path."""
    out_dir = Path(out_dir)
    build_pipeline(DTYPES[dtype], device, seed).save_pretrained(out_dir, safe_serialization=True)
    # the same folder fix-ups as the tiny model's: vocabulary files for transformers 4.x, and SDXL's
    # "text_model." key prefix in text_encoder so loading takes the same key conversion as real SSD-1B
    write_vocab_files(out_dir / "tokenizer")
    write_vocab_files(out_dir / "tokenizer_2")
    add_text_model_prefix(out_dir / "text_encoder" / "model.safetensors")
    return out_dir


def folder_size_gb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e9


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, nargs="?", help="folder to write the pipeline into")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="dtype of the saved weights")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the random weights are drawn (a GPU draws them in seconds)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    parser.add_argument("--check", action="store_true",
                        help="only build every part on the meta device and compare parameter counts with SSD-1B's")
    args = parser.parse_args(argv)
    if args.check:
        sys.exit(0 if check() else 1)
    if args.out_dir is None:
        parser.error("OUT_DIR is required (or pass --check)")
    started = time.perf_counter()
    out_dir = make_full_ssd1b(args.out_dir, args.dtype, args.device, args.seed)
    print(f"{out_dir}: {folder_size_gb(out_dir):.2f} GB ({args.dtype}) in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
