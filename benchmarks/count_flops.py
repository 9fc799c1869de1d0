"""Count the FLOPs of one LoRA training step, off the trainer's path: on meta tensors, so nothing is computed.

    python benchmarks/count_flops.py MODEL_DIR --resolution 1024 --batch 2 [--gradient_checkpointing]

What a step costs is the UNet's forward and backward (with the caches on, the VAE and the text encoders do not
run per step); run_benchmarks.py divides it by the trainer's own ms/step for MFU. The trainer itself counts
nothing, so no real step pays for the counter.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_dreambooth_lora_ssd1b as trainer  # noqa: E402

# dense bf16/fp16 tensor-core peaks from the datasheets, per GPU: the denominator of MFU
PEAK_TFLOPS = {"H100": 989, "H200": 989, "A100": 312, "A6000": 155, "L40S": 362, "L40": 181, "4090": 165,
               "A10G": 70, "L4": 121}


def device_peak_tflops(device_name: str) -> float | None:
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in device_name), None)


def step_flops(model: Path, resolution: int, batch: int, rank: int = 8, gradient_checkpointing: bool = False) -> int:
    """FLOPs of the UNet's forward and backward on `batch` latents (instance + class images), LoRA on it as the
    trainer adds it."""
    return sum(step_flop_counts(model, resolution, batch, rank, gradient_checkpointing).values())


def step_flop_counts(model: Path, resolution: int, batch: int, rank: int = 8,
                     gradient_checkpointing: bool = False) -> dict[str, int]:
    """step_flops by operator. Built from the model's config on the meta device: the count needs shapes, not
    weights, and attention is counted as its matrix products (a real CPU run's fused attention kernel is not
    counted by torch's FlopCounterMode at all)."""
    config = UNet2DConditionModel.load_config(Path(model) / "unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        unet.requires_grad_(False)
        unet.add_adapter(trainer.LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                            target_modules=trainer.UNET_TARGETS))
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        side = resolution // 8
        add_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        inputs = dict(sample=torch.randn(batch, config["in_channels"], side, side), timestep=torch.ones(batch),
                      encoder_hidden_states=torch.randn(batch, 77, config["cross_attention_dim"]),
                      added_cond_kwargs={"text_embeds": torch.randn(batch, add_dim), "time_ids": torch.zeros(batch, 6)})
        counter = FlopCounterMode(display=False)
        with counter:
            unet(**inputs).sample.pow(2).mean().backward()
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path, help="a diffusers folder with unet/config.json")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2, help="latents per step: instance + class images")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--gradient_checkpointing", action="store_true")
    args = p.parse_args(argv)
    flops = step_flops(args.model, args.resolution, args.batch, args.rank, args.gradient_checkpointing)
    print(f"{flops / 1e12:.4g} TFLOP per step")


if __name__ == "__main__":
    main()
