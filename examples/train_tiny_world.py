"""Pre-train the tiny SSD-1B-shaped model on the tiny world, from scratch, on a CPU; reproducible from a seed.

    python examples/train_tiny_world.py OUT_DIR [--seed 0] [--vae_steps 2000] [--unet_steps 10000]
    python examples/train_tiny_world.py OUT_DIR --vae examples/tiny_world_model/vae     # stage 2 only

The result, examples/tiny_world_model/, is shipped, so nothing else retrains it. It has the real model's classes
and layout (SDXL pipeline folder, UNet with text_time conditioning, both CLIP text encoders, an 8x VAE), wider than
the random test model's, and it generates the world of examples/tiny_world.py from captions.
1. The VAE learns to reconstruct photos: half of them the world's, half the world's shapes with the object and
   the background in any colour (tiny_world.any_colour_photo; from the world's alone it learnt to snap colours to
   the world's palette, teal to blue-grey). Its loss is the MSE, each object pixel weighted 5 times (the object is
   a sixth of a photo, and the part a render is judged by), and a very light KL term; it trains in bfloat16
   autocast, which is 1.6x faster on a CPU with AVX512-BF16 or AMX. Its scaling_factor is then set to 1 / the
   latents' standard deviation, as Stable Diffusion's was. It prints how near the VAE brings the subject's photos
   back to the subject: the UNet cannot draw what the VAE cannot reconstruct.
2. The UNet and both text encoders (all weights) learn together to denoise those scaled latents (epsilon, SDXL's
   noise schedule) given the captions' SDXL conditioning, computed by diffusers' own
   StableDiffusionXLPipeline.encode_prompt, the path every render takes: both text encoders' penultimate layers,
   the pooled projection, and time ids (64, 64, 0, 0, 64, 64). One caption in ten is dropped to all zeros, the
   pipeline's unconditional, so classifier-free guidance works. The weights saved are an exponential moving
   average. Random text encoders made captions differ too little for the UNet to follow colour words; trained,
   they do. The identifier "sks" has its own token and never appears in a caption, so it stays untrained.
Stage 2 draws from its own seeds, so `--vae` (a VAE that stage 1 made with the same seed) gives the same model.
The photos come from a pool of --pool drawn once, each also seen mirrored.
It trains on one thread unless OMP_NUM_THREADS is set (`OMP_NUM_THREADS=2 python examples/train_tiny_world.py ...`
on a quiet machine with cores to spare); tiny_world_training.json records the thread count.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_world  # noqa: E402
from make_tiny_ssd1b import (SCHEDULER_CONFIG, make_text_encoders, make_tokenizers, make_unet,  # noqa: E402
                             make_vae, save_pipeline)

UNET_WIDTHS = (32, 64, 64)
VAE_WIDTHS = (16, 32, 64, 64)
TIME_IDS = (64, 64, 0, 0, 64, 64)  # original size, crop top-left, target size: what a 64 px render passes
UNCONDITIONAL = 0.1
TEXT_ENCODER_LR = 5e-4
OBJECT_WEIGHT = 4.0  # the VAE's loss weighs each object pixel 1 + this


def pixels(images):
    return torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) for im in images]) / 127.5 - 1


def learning_rate(step, steps, peak, warmup=100):
    return peak * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


def fix_variance(vae, logvar=-20.0):
    """Make the encoder's posterior a point: its log-variance outputs a constant e^-20 whatever the photo.

    With a learnt variance that starts at 1, the decoder spends its short training undoing sampling noise, and
    draws blurred, greyed colours; a real VAE's posterior is nearly a point too (std ~1e-3 for SDXL's)."""
    with torch.no_grad():
        half = vae.quant_conv.out_channels // 2
        vae.quant_conv.weight[half:].zero_()
        vae.quant_conv.bias[half:].fill_(logvar)


def train_vae(vae, photos, steps, batch_size, rng, log_every):
    """photos: (image, weights) pairs, the weights 1 + OBJECT_WEIGHT on the object's pixels, as a 1x64x64 tensor."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    fix_variance(vae)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, 1e-3)
        picked = [rng.choice(photos) for _ in range(batch_size)]
        flips = [rng.random() < 0.5 for _ in picked]
        x = pixels([im.transpose(Image.FLIP_LEFT_RIGHT) if flip else im for (im, _), flip in zip(picked, flips)])
        weights = torch.stack([w.flip(-1) if flip else w for (_, w), flip in zip(picked, flips)])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            posterior = vae.encode(x).latent_dist
            decoded = vae.decode(posterior.sample()).sample
        loss = (weights * (decoded.float() - x) ** 2).mean() + 1e-6 * posterior.kl().float().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        fix_variance(vae)
        if step % log_every == 0 or step == steps - 1:
            print(f"vae step {step}: loss {loss.item():.4f}", flush=True)
    vae.eval().requires_grad_(False)


def vae_photos(pool, seed):
    """The VAE's training photos: the pool's, and as many of any colour drawn from their own seed, each with its
    loss weights (1 + OBJECT_WEIGHT on the object, tiny_world.object_mask)."""
    rng = random.Random(f"{seed} any colour")
    images = [photo for photo, _ in pool] + [tiny_world.any_colour_photo(rng) for _ in pool]
    return [(im, 1 + OBJECT_WEIGHT * torch.from_numpy(tiny_world.object_mask(im)).float()[None]) for im in images]


def report_reconstruction(vae):
    """How near the VAE brings the subject's photos back to the subject (tiny_world.subject_distance), beside the
    photos' own distance: the UNet cannot draw what the VAE cannot reconstruct. Measured only; nothing trains on it.
    Prints both and returns them, as two lists of distances."""
    photos = tiny_world.subject_photos()
    profile = tiny_world.subject_profile(photos)
    with torch.no_grad():
        decoded = vae.decode(vae.encode(pixels(photos)).latent_dist.mode()).sample
    rebuilt, own = ([round(tiny_world.subject_distance([image], profile), 2) for image in images]
                    for images in (VaeImageProcessor().postprocess(decoded, output_type="pil"), photos))
    print(f"vae: the subject's photos reconstructed at distance {rebuilt} to the subject (the photos: {own})",
          flush=True)
    return rebuilt, own


def encode_pool(vae, pool):
    """Each photo's VAE posterior (mean and log-variance), and its mirror image's; sets the VAE's scaling_factor."""
    plain, mirrored = [], []
    with torch.no_grad():
        for i in range(0, len(pool), 64):
            images = [photo for photo, _ in pool[i:i + 64]]
            plain.append(vae.encode(pixels(images)).latent_dist.parameters)
            mirrored.append(vae.encode(pixels([im.transpose(Image.FLIP_LEFT_RIGHT) for im in images])).latent_dist.parameters)
    moments = torch.cat(plain + mirrored)  # row i is pool[i % len(pool)]
    std = moments[:, :4].std()
    vae.register_to_config(scaling_factor=float(1 / std))
    print(f"vae latents' std {std.item():.4f}: scaling_factor {vae.config.scaling_factor:.5f}", flush=True)
    return moments


def conditioning(pipe, captions):
    """The captions' SDXL conditioning, through the pipeline's own encode_prompt (the path every render takes),
    with gradients, as the text encoders train with the UNet."""
    embeds, _, pooled, _ = pipe.encode_prompt(list(captions), device="cpu", do_classifier_free_guidance=False)
    return embeds, pooled


def train_unet(pipe, pool, moments, steps, batch_size, rng, log_every):
    """The UNet and both text encoders, all weights, to denoise the photos' latents given their captions."""
    unet, vae = pipe.unet, pipe.vae
    scheduler = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    unet_params = list(unet.parameters())
    text_params = [p for encoder in (pipe.text_encoder, pipe.text_encoder_2) for p in encoder.parameters()]
    params = unet_params + text_params
    optimizer = torch.optim.AdamW([{"params": unet_params, "peak": 1e-3},
                                   {"params": text_params, "peak": TEXT_ENCODER_LR}], weight_decay=1e-2)
    ema = [p.detach().clone() for p in params]
    time_ids = torch.tensor([TIME_IDS], dtype=torch.float32).repeat(batch_size, 1)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, group["peak"])
        picked = [rng.randrange(len(moments)) for _ in range(batch_size)]
        latents = DiagonalGaussianDistribution(moments[picked]).sample() * vae.config.scaling_factor
        embeds, pooled = conditioning(pipe, [tiny_world.caption(*pool[i % len(pool)][1], rng=rng) for i in picked])
        dropped = torch.tensor([rng.random() < UNCONDITIONAL for _ in picked])
        embeds, pooled = embeds.masked_fill(dropped[:, None, None], 0), pooled.masked_fill(dropped[:, None], 0)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,))
        prediction = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, encoder_hidden_states=embeds,
                          added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for average, p in zip(ema, params):
                average.lerp_(p, 1 - decay)
        if step % log_every == 0 or step == steps - 1:
            print(f"unet step {step}: loss {loss.item():.4f}", flush=True)
    with torch.no_grad():
        for average, p in zip(ema, params):
            p.copy_(average)


def reuse_vae(vae, path):
    """--vae: stage 1's weights from an earlier run, loaded into this run's VAE, whose config stays as stage 1 makes
    it; anything else is refused in one line, before the pool is drawn."""
    try:
        vae.load_state_dict(AutoencoderKL.from_pretrained(path).state_dict())
    except (OSError, ValueError, RuntimeError) as error:
        raise SystemExit(f"error: --vae {path} is not a VAE this script trained ({str(error).splitlines()[0]}); give "
                         "the vae folder of a model it made, e.g. examples/tiny_world_model/vae, or leave --vae out")
    return vae.eval().requires_grad_(False)


def at_least_one(text):
    """argparse type for counts: an int of 1 or more, or a one-line usage error naming the value."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 1 or more")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool", type=at_least_one, default=8000, help="photos of the world drawn, once")
    parser.add_argument("--vae_steps", type=at_least_one, default=6000)
    parser.add_argument("--vae_batch_size", type=at_least_one, default=16)
    parser.add_argument("--unet_steps", type=at_least_one, default=10000)
    parser.add_argument("--batch_size", type=at_least_one, default=24)
    parser.add_argument("--log_every", type=at_least_one, default=100)
    parser.add_argument("--vae", type=Path, help="a VAE folder this script trained with the same --seed, --pool and "
                        "--vae_* flags (e.g. examples/tiny_world_model/vae): skips stage 1, which it equals")
    args = parser.parse_args(argv)
    tiny_world.one_thread_unless_set()
    if args.out_dir.exists():
        parser.error(f"{args.out_dir} exists; give a new folder")
    try:  # the model is written only after an hour of training: find out now that it can be
        args.out_dir.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=args.out_dir.parent).close()
    except OSError as error:
        parser.error(f"cannot write in {args.out_dir.parent} ({error.strerror}); give a folder you can write to")
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    words = tiny_world.world_vocabulary()
    tokenizers = make_tokenizers(words)
    text_encoders = make_text_encoders(len(tokenizers[0]), args.seed)
    vae, unet = make_vae(args.seed, VAE_WIDTHS), make_unet(args.seed, UNET_WIDTHS)
    if args.vae:
        vae = reuse_vae(vae, args.vae)
    torch.manual_seed(args.seed)
    pool = [tiny_world.sample(rng)[::2] for _ in range(args.pool)]
    print(f"{len(pool)} photos drawn in {time.perf_counter() - started:.0f} s", flush=True)
    if not args.vae:
        train_vae(vae, vae_photos(pool, args.seed), args.vae_steps, args.vae_batch_size, rng, args.log_every)
    report_reconstruction(vae)
    moments = encode_pool(vae, pool)
    torch.manual_seed(args.seed + 1)  # stage 2 draws from its own seeds, so a reused VAE gives the same model
    rng = random.Random(f"{args.seed} stage 2")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1],
                                     tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet,
                                     scheduler=DDPMScheduler.from_config(SCHEDULER_CONFIG))
    train_unet(pipe, pool, moments, args.unet_steps, args.batch_size, rng, args.log_every)
    seconds = time.perf_counter() - started
    partial = args.out_dir.with_name(args.out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save_pipeline(partial, vae, [encoder.eval() for encoder in text_encoders], tokenizers, unet.eval(), words)
    record = {"seed": args.seed, "pool": args.pool, "vae_steps": args.vae_steps, "vae_batch_size": args.vae_batch_size,
              "vae_reused": str(args.vae) if args.vae else None, "unet_steps": args.unet_steps,
              "text_encoder_lr": TEXT_ENCODER_LR, "batch_size": args.batch_size, "seconds": round(seconds),
              "torch_threads": torch.get_num_threads(),
              "torch": torch.__version__, "machine": platform.processor() or platform.machine()}
    (partial / "tiny_world_training.json").write_text(json.dumps(record, indent=1) + "\n")
    partial.rename(args.out_dir)
    print(f"{args.out_dir}: trained in {seconds / 60:.1f} min on {torch.get_num_threads()} threads")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # nothing is written before both stages end, so there is nothing to resume from
        print("\ninterrupted: the model is written only when both stages end, so nothing was; run the command "
              "again to start over", file=sys.stderr)
        sys.exit(130)
