"""The trainer's memory estimate against its measured peak RSS on a CPU, and the runs its coefficients come from.

    python benchmarks/memory_estimate.py --model /tmp/full-ssd1b --calibrate        # the 128 px fitting runs
    python benchmarks/memory_estimate.py --model /tmp/full-ssd1b --check 128 256    # estimate vs measured
    python benchmarks/memory_estimate.py --model /tmp/full-ssd1b --check 128 --base fp8 nf4

Each row is one trainer process, run and sampled as benchmarks/cpu_memory.py runs it (peak RSS from the child's
ru_maxrss, phase peaks from VmHWM between the trainer's own lines), in cpu_memory.py's setting: rank 8, 8-bit
AdamW, --center_crop, latents cached, one thread, bf16. The estimate is read from the line the trainer prints
before any model loads. --calibrate fits dreambooth_kit/memory.py's measured constants from its rows and prints
them: activations from batch 1 against batch 2 (gradient checkpointing off and on), the rest from what the phase
peaks hold beyond the weights; the constants are then written into memory.py by hand, with where they came from.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu_memory  # noqa: E402  (the sampling and the phases)
from cpu_memory import GIB  # noqa: E402

ESTIMATE = re.compile(r"memory estimate: peak (?P<peak>[\d.]+) GiB in (?P<phase>[a-z ]+) \(")
PROCESS = re.compile(r"process (?P<process>[\d.]+) GiB before any model loads.*by phase: (?P<phases>.*)$")
BASE_FLAGS = {"bf16": [], "fp8": ["--fp8_base"], "nf4": ["--nf4_base"]}
STEPS = 4


def flags(resolution, batch, checkpointing, base="bf16", extra=()):
    return ["--resolution", str(resolution), "--mixed_precision", "bf16", "--train_batch_size", str(batch),
            "--rank", "8", "--optimizer", "adamw8bit", "--max_train_steps", str(STEPS), "--center_crop",
            "--cache_latents", "on", *(["--gradient_checkpointing"] if checkpointing else []), *BASE_FLAGS[base],
            *extra]


def run_row(name, row_flags, args) -> dict:
    """One trainer process: its estimate (as printed), measured peak and phase peaks, in GiB."""
    output_dir = args.work_dir / name
    command = cpu_memory.trainer_command(args.model, args.instance_dir, output_dir, row_flags)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    run = cpu_memory.run_and_sample(command, ROOT, env, args.work_dir / f"{name}.log")
    if run["returncode"]:
        raise SystemExit(f"{name}: the trainer exited {run['returncode']}: see {args.work_dir / name}.log")
    lines = [line for _, line in run["lines"]]
    estimate = next(ESTIMATE.search(line) for line in lines if ESTIMATE.search(line))
    process = next(PROCESS.search(line) for line in lines if PROCESS.search(line))
    bounds = cpu_memory.phase_bounds(run["lines"], run["wall"])
    peaks = cpu_memory.phase_peaks(run["samples"], bounds)
    measured = max(run["maxrss"], *(s[2] for s in run["samples"]))
    return {"name": name, "flags": row_flags, "estimate_gib": float(estimate["peak"]),
            "estimate_phase": estimate["phase"], "process_gib": float(process["process"]),
            "estimate_phases": process["phases"], "measured_gib": measured / GIB,
            "measured_phase": cpu_memory.peak_phase(run["samples"], bounds, measured),
            "phase_peaks_gib": {k: v / GIB for k, v in peaks.items()},
            "ratio": float(estimate["peak"]) / (measured / GIB)}


CLASS_IMAGE = ["--with_prior_preservation", "--class_prompt", "a photo of dog", "--num_class_images", "1",
               "--sample_batch_size", "1"]
CALIBRATION = {"b1_gc_off": flags(128, 1, False), "b2_gc_off": flags(128, 2, False),
               "b1_gc_on": flags(128, 1, True), "b2_gc_on": flags(128, 2, True),
               "class_image": flags(128, 1, False, extra=CLASS_IMAGE),
               "class_image_256": flags(256, 1, False, extra=CLASS_IMAGE)}


def parts(model, row_flags):
    """The estimate's weights and training parts for a row's flags, in bytes, from the package itself."""
    import train_dreambooth_lora_ssd1b as trainer
    from dreambooth_kit import memory

    args = trainer.parse_args(cpu_memory.trainer_command(model, ROOT / "examples" / "dog", Path("/tmp/unused"),
                                                         row_flags)[1:])
    counts = memory.count_models(str(model), str(model / "vae"), None,
                                 (trainer.UNET_TARGETS, trainer.TEXT_ENCODER_TARGETS))
    setting = memory.setting_from_args(args, trainer.derive_settings(args, []), type("D", (), {"type": "cpu"}),
                                       "bf16")
    return counts, setting, memory.estimate(counts, setting).parts


def calibrate(rows, args) -> dict:
    """memory.py's measured constants from the calibration rows (the process's RSS before any model loads is what
    the trainer printed as "process"). Run under MALLOC_MMAP_THRESHOLD_, so that no heap holes are in them."""
    from dreambooth_kit import memory

    fitted = {}
    base = lambda row: row["process_gib"] * GIB  # noqa: E731
    for gc in (False, True):
        one, two = rows[f"b1_gc_{'on' if gc else 'off'}"], rows[f"b2_gc_{'on' if gc else 'off'}"]
        counts, setting, p1 = parts(args.model, one["flags"])
        _, _, p2 = parts(args.model, two["flags"])
        held = lambda p: p["UNet"] + p["VAE"] + p["LoRA (fp32)"] + p["gradients"] + p["optimizer state"]  # noqa
        rise = (two["phase_peaks_gib"]["training"] * GIB - base(two) - held(p2)) - \
               (one["phase_peaks_gib"]["training"] * GIB - base(one) - held(p1))
        fitted[f"ACTIVATION_BYTES[{gc}]"] = rise / memory.latent_pixels(128)  # one sample more
        fitted[f"TRAINING_OVERHEAD (gc {gc})"] = (one["phase_peaks_gib"]["training"] * GIB - base(one) - held(p1)
                                                  - fitted[f"ACTIVATION_BYTES[{gc}]"] * memory.latent_pixels(128))
    one = rows["b1_gc_off"]
    _, _, p = parts(args.model, one["flags"])
    vae = counts.vae.weight_bytes("fp32" if counts.vae_upcast else "bf16", "bf16")
    load = one["phase_peaks_gib"]["load"] * GIB - base(one) - p["text encoders"] - vae
    fitted["TEXT_ENCODER_LOAD_SHARE"] = load / p["text encoders"]
    rendering = {r: rows[name]["phase_peaks_gib"]["caches"] * GIB - base(rows[name]) - p["text encoders"] - vae
                 - p["UNet"] for r, name in ((128, "class_image"), (256, "class_image_256"))}
    # one image, its latents twice (classifier-free guidance): the slope between 128 and 256 px, and what is left
    slope = (rendering[256] - rendering[128]) / (memory.latent_pixels(256) - memory.latent_pixels(128))
    fitted["RENDER_BYTES"] = slope / 2
    fitted["RENDER_FIXED"] = rendering[128] - slope * memory.latent_pixels(128)
    return fitted


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="a folder written by make_full_ssd1b.py")
    p.add_argument("--instance_dir", type=Path, default=ROOT / "examples" / "dog")
    p.add_argument("--work_dir", type=Path, default=ROOT / "work_dirs" / "memory_estimate")
    p.add_argument("--calibrate", action="store_true", help="the 128 px rows memory.py's constants come from")
    p.add_argument("--check", type=int, nargs="*", default=[], help="resolutions to compare estimate and peak at")
    p.add_argument("--base", nargs="+", choices=list(BASE_FLAGS), default=["bf16"])
    p.add_argument("--checkpointing", nargs="+", choices=["off", "on"], default=["off", "on"])
    args = p.parse_args(argv)
    args.model, args.work_dir = args.model.resolve(), args.work_dir.resolve()
    args.instance_dir = args.instance_dir.resolve()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    rows = {}
    todo = dict(CALIBRATION) if args.calibrate else {}
    todo.update({f"{base}_{r}px_gc_{gc}": flags(r, 1, gc == "on", base)
                 for r in args.check for base in args.base for gc in args.checkpointing})
    for name, row_flags in todo.items():
        rows[name] = run_row(name, row_flags, args)
        print(json.dumps(rows[name]), flush=True)
    if args.calibrate:
        print(json.dumps(calibrate(rows, args), indent=1))
    print("| row | estimate (GiB) | in | measured peak RSS (GiB) | in | estimate / measured |")
    print("|---|---|---|---|---|---|")
    for row in rows.values():
        print(f"| {row['name']} | {row['estimate_gib']:.2f} | {row['estimate_phase']} | {row['measured_gib']:.2f} | "
              f"{row['measured_phase']} | {row['ratio']:.2f} |")


if __name__ == "__main__":
    main()
