"""Peak GPU memory and ms/step of the trainer at 1024 px, per base precision, with diffusers' script beside it.

    python benchmarks/gpu_memory.py                    # one H100: builds the random model, 8 rows (~6 min, untimed)
    python benchmarks/gpu_memory.py --model DIR --diffusers_script PATH/train_dreambooth_lora_sdxl.py
    python benchmarks/gpu_memory.py --tiny             # a CPU: the plumbing only (peak RSS), seconds a row

run_benchmarks.py's fast mode (1024 px, batch 1 + one class image copied from a photo, rank 8, 8-bit AdamW, bf16,
latent cache on) for 13 steps, of which the trainer times 4 to 13: one trainer process per base (bf16, --fp8_base,
--nf4_base; "not run" where its --help lacks the flag) x gradient checkpointing (off, on), on make_full_ssd1b.py's
model (built in --work_dir unless --model names one). The figures are the trainer's closing line, "steady-state X
ms/step over N steps; peak GPU memory A GiB in training (B GiB in the whole run)" (torch.cuda.max_memory_allocated:
not the CUDA context or cache nvidia-smi adds), and the estimate line it prints before loading, where it does.

diffusers' train_dreambooth_lora_sdxl.py (not in its pip package: --diffusers_script names a copy) runs with the
same settings at bf16 under `--measure`, in a child process as `python SCRIPT ARGS` would: its "Steps" bar timed at
each update after a device sync (it reads its loss back there anyway), the allocator's peak reset when that bar is
made, closed by the trainer's telemetry.report, so both lines mean the same. It encodes each step's images with
its fp32 VAE: no latent cache.

Floor: a step on 2 images at 1024 px is 17.47 TFLOP forward and backward, 25.91 with checkpointing's recomputation
(benchmarks/ssd1b/README.md): at an H100's ~798 TFLOP/s of bf16 matrix product, >= ~22 ms (32 ms with
checkpointing). Each row has count_flops.py's count and its time at the bf16 rate measured just before the rows.

Records (machine, versions, date, settings, command) go to RESULTS-gpu-memory.json and the table between this
script's markers in RESULTS.md after each row, so a run cut short keeps what it measured; a row that might end
past --budget_s (the longest row so far is the guess) is left out, and said so.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # this checkout's package and the benchmarks it reuses
from run_benchmarks import (INSTANCE_PROMPT, TRAINER, machine, measure_bf16_ceiling, mode_flags,  # noqa: E402
                            parse_report, prepare_tiny_model, provide_class_image, run_trainer, shown,
                            trainer_command, versions, write_records)

BASES = {"bf16": [], "fp8": ["--fp8_base"], "nf4": ["--nf4_base"]}
CHECKPOINTING = ["off", "on"]
STEPS = 13  # the trainer's first window closes at step 3 (its warm-up); steps 4 to 13 are timed
BEGIN, END = "<!-- gpu memory: begin (written by gpu_memory.py) -->", "<!-- gpu memory: end -->"
ESTIMATE = re.compile(r"^.*\bestimate.*$", re.IGNORECASE | re.MULTILINE)


def measure(argv: list[str]) -> None:
    """Run SCRIPT ARGS in this process as `python SCRIPT ARGS` would, and close with the trainer's report: steps
    timed at each update of the "Steps" bar, the allocator's peak reset when that bar is made."""
    import runpy

    import torch
    import tqdm.std

    from dreambooth_kit import telemetry

    cuda, clock, bars, times = torch.cuda.is_available(), telemetry.Clock(), [], []
    init, update = tqdm.std.tqdm.__init__, tqdm.std.tqdm.update

    def made(bar, *args, **kwargs):
        init(bar, *args, **kwargs)
        if kwargs.get("desc") == "Steps" and not bars:
            bars.append(bar)
            if cuda:  # training starts: what came before is the load's peak, as the trainer counts it
                clock.peak_before_training = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            times.append(time.perf_counter())

    def stepped(bar, n=1):
        if bars and bar is bars[0]:  # not `in`: tqdm's == compares bars' screen positions
            if cuda:
                torch.cuda.synchronize()  # the step's kernels are done: device time, not the launch queue's
            times.append(time.perf_counter())
        return update(bar, n)

    tqdm.std.tqdm.__init__, tqdm.std.tqdm.update = made, stepped
    ours = {str(ROOT), str(ROOT / "benchmarks")}  # out of its way (ROOT has an evaluate.py): its own folder first
    sys.argv, sys.path[:] = argv, [str(Path(argv[0]).resolve().parent), *(p for p in sys.path if p not in ours)]
    runpy.run_path(argv[0], run_name="__main__")
    warm = min(telemetry.WARMUP_STEPS, len(times) - 2)  # times[k]: when step k ended (times[0]: the bar was made)
    clock.windows = [(1, warm, times[warm] - times[0]), (warm + 1, len(times) - 1 - warm, times[-1] - times[warm])]
    clock.phases["training"] = times[-1] - times[0]
    telemetry.report(types.SimpleNamespace(print=print, log=lambda values: None), clock, 0)


SHARED = ["--resolution", "--mixed_precision", "--max_train_steps", "--rank", "--class_prompt", "--train_batch_size"]


def values(flags: list[str]) -> dict[str, str]:
    """The values of the flags both trainers share, as run_benchmarks' fast mode sets them."""
    return {flag: flags[flags.index(flag) + 1] for flag in SHARED}


def diffusers_command(script: Path, flags: list[str], model: Path, args, out: Path, checkpointing: str) -> list[str]:
    """diffusers' flags for our setting."""
    return [shown(Path(__file__)), "--measure", str(script), "--pretrained_model_name_or_path", shown(model),
            "--pretrained_vae_model_name_or_path", shown(model / "vae"), "--instance_data_dir",
            shown(args.instance_dir), "--instance_prompt", INSTANCE_PROMPT, "--with_prior_preservation",
            "--class_data_dir", shown(out / "class_images"), "--num_class_images", "1", "--use_8bit_adam",
            "--center_crop", "--seed", "0", "--output_dir", shown(out / f"checkpointing-{checkpointing}"),
            *[item for pair in values(flags).items() for item in pair],
            *(["--gradient_checkpointing"] if checkpointing == "on" else [])]


@functools.cache
def trainer_help() -> str:
    return subprocess.run([sys.executable, TRAINER, "--help"], cwd=ROOT, capture_output=True, text=True).stdout


def why_not(trainer: str, base: str, args) -> str | None:
    """Why a row cannot run here, or None."""
    if trainer == "diffusers":
        if not args.diffusers_script:
            return "no --diffusers_script given (its examples/ are not in the pip package)"
        return None if args.diffusers_script.is_file() else f"{args.diffusers_script} is not a file"
    missing = [flag for flag in BASES[base] if flag not in trainer_help()]
    return f"the trainer has no {' '.join(missing)} (its --help lacks it)" if missing else None


def run_row(trainer, base, checkpointing, flags, model, args, context) -> dict:
    """One row: the process, its closing report and the estimate it printed, or why it did not run."""
    record = {**context, "trainer": trainer, "base": base, "checkpointing": checkpointing,
              "settings": {**{flag.lstrip("-"): value for flag, value in values(flags).items()}, "base": base,
                           "gradient_checkpointing": checkpointing == "on", "class images": "1, a copy of a photo",
                           "optimizer": "8-bit AdamW", "steps timed": f"4 to {STEPS}"}}
    if reason := why_not(trainer, base, args):
        return {**record, "status": "not run", "reason": reason}
    if trainer == "ours":
        command = trainer_command(f"{base}-checkpointing-{checkpointing}", [*flags, *BASES[base], *(
            ["--gradient_checkpointing"] if checkpointing == "on" else [])], model, args.instance_dir, args.work_dir)
    else:
        command = diffusers_command(args.diffusers_script.resolve(), flags, model, args, args.work_dir / "diffusers",
                                    checkpointing)
    record["command"] = f"HF_HUB_OFFLINE=1 python {shlex.join(command)}"
    log = args.work_dir / f"{trainer}-{base}-checkpointing-{checkpointing}.log"
    started = time.perf_counter()
    try:
        output, wall = run_trainer(command, log)
    except SystemExit as failed:  # run_trainer's one line; the last line of the log says why
        last = [line for line in log.read_text().splitlines() if line.strip()][-1:] or [""]
        return {**record, "status": "failed", "reason": f"{failed}: {last[0][:300]}",
                "wall": time.perf_counter() - started}
    estimate, tflop = ESTIMATE.search(output), step_tflop(model, int(values(flags)["--resolution"]), checkpointing)
    return {**record, "status": "measured", "wall": wall, **parse_report(output), "tflop": tflop,
            "floor_ms": 1000 * tflop / context["ceiling"] if context["ceiling"] else None,
            "estimate": estimate[0].strip() if estimate else None}


@functools.cache
def step_tflop(model: Path, resolution: int, checkpointing: str) -> float:
    """The UNet's step on instance + class latents (batch 2), forward and backward, and the recomputation."""
    from count_flops import step_flops  # it imports the trainer: only rows that ran need it

    return step_flops(model, resolution, 2, gradient_checkpointing=checkpointing == "on") / 1e12


def cell(record: dict) -> str:
    """ms/step and memory, or why there are none."""
    if record["status"] != "measured":
        return f"{record['status']}: {record['reason'].replace('|', '/')} | | | | | "
    floor_ms = f"{record['floor_ms']:.0f} ({100 * record['floor_ms'] / record['ms']:.0f}%)" if record[
        "floor_ms"] else "n/a"
    kind = "GPU" if record["memory"] == "peak GPU memory" else "RSS"
    run_gib = f"{record['run_gib']:.2f}" if record.get("run_gib") else "n/a"
    return (f"{record['ms']:.1f} ({record['steps']}) | {floor_ms} | {record['gib']:.2f} {kind} | {run_gib} "
            f"| {(record['estimate'] or 'none printed').replace('|', '/')} | {record['wall']:.0f}")


def render(records: list[dict]) -> str:
    order = [(s, t, b, c) for s in ("full", "tiny") for t in ("ours", "diffusers") for b in BASES
             for c in CHECKPOINTING]
    records = sorted(records, key=lambda r: (order.index(key(r)[:4]), r["machine"]))
    lines = [BEGIN, "", "| size | trainer | base | gradient checkpointing | ms/step (steps timed) | floor, ms (of the "
             "step) | peak memory in training (GiB) | whole run (GiB) | estimate printed | wall (s) | machine |",
             "|---" * 11 + "|"]
    for r in records:
        size = "full" if r["size"] == "full" else "tiny (plumbing only)"
        lines.append(f"| {size} | {r['trainer']} | {r['base']} | {r['checkpointing']} | {cell(r)} | {r['machine']} |")
    lines += ["", "Date, versions and the exact command of each row:", ""]
    for r in (r for r in records if "command" in r):
        packages = ", ".join(f"{name} {version}" for name, version in r["versions"].items())
        lines += [f"- **{r['size']} {r['trainer']} {r['base']}, checkpointing {r['checkpointing']}** ({r['date']}, "
                  f"{packages})", "", "  ```bash", f"  {r['command']}", "  ```", ""]
    return "\n".join([*lines, END])


def key(record: dict) -> tuple:
    return record["size"], record["trainer"], record["base"], record["checkpointing"], record["machine"]


def build_model(args) -> Path:
    """The model folder: --model, the tiny one, or the full-size random one drawn here (renamed into place when
    complete, so a build cut short is never taken for a model)."""
    if args.model:
        return args.model.resolve()
    if args.tiny:
        return prepare_tiny_model(args.work_dir)
    model = args.work_dir / "ssd1b-full"
    if not (model / "model_index.json").is_file():
        partial = args.work_dir / "ssd1b-full.partial"
        for folder in partial, model:  # an earlier build cut short, in either
            shutil.rmtree(folder, ignore_errors=True)
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_full_ssd1b.py"), str(partial)], check=True)
        partial.rename(model)
    return model


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="a folder written by make_full_ssd1b.py, or with --tiny a tiny "
                                              "model's (default: built in --work_dir)")
    p.add_argument("--tiny", action="store_true", help="the tiny model at 64 px in fp32 on a CPU: the plumbing")
    p.add_argument("--diffusers_script", type=Path, help="a copy of diffusers' train_dreambooth_lora_sdxl.py")
    p.add_argument("--bases", nargs="+", choices=list(BASES), default=list(BASES))
    p.add_argument("--checkpointing", nargs="+", choices=CHECKPOINTING, default=CHECKPOINTING)
    p.add_argument("--budget_s", type=float, default=480, help="seconds: a row that might end past it (the longest so "
                   "far is the guess) is left out (default: one 10-minute call, with room for wheels and copying)")
    p.add_argument("--instance_dir", type=Path, default=ROOT / "examples" / "dog")
    p.add_argument("--work_dir", type=Path, default=ROOT / "work_dirs" / "gpu_memory",
                   help="the model, output dirs and logs; the trainer's output dirs are replaced")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = p.parse_args(argv)
    if args.model and not (args.model / "model_index.json").is_file():
        p.error(f"--model {args.model} has no model_index.json: give a folder written by make_full_ssd1b.py")
    args.work_dir, args.instance_dir = args.work_dir.resolve(), args.instance_dir.resolve()
    return args


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--measure"]:
        return measure(argv[1:])
    args, started = parse_args(argv), time.perf_counter()
    if missing := [name for name, version in versions().items() if version == "missing"]:  # before a 1-minute build
        sys.exit(f"gpu_memory.py: every row needs {' and '.join(missing)}, not installed here (without a network: "
                 "install wheels, as benchmarks/RESULTS.md's 'Open: GPU figures' says)")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(args)
    provide_class_image(args.work_dir, args.instance_dir)
    provide_class_image(args.work_dir / "diffusers", args.instance_dir)  # its own: it counts every file there
    flags = mode_flags(args.tiny)["fast"]
    flags[flags.index("--max_train_steps") + 1] = str(STEPS)
    context = {"size": "tiny" if args.tiny else "full", "machine": machine(), "versions": versions(),
               "date": datetime.date.today().isoformat(), "ceiling": measure_bf16_ceiling()}
    print(json.dumps(context), flush=True)
    rows = [(t, b, c) for t in ("ours", "diffusers") for b in args.bases for c in args.checkpointing
            if t == "ours" or b == "bf16"]
    longest = 0.0  # the longest row so far: what the next one may take
    for number, (trainer, base, checkpointing) in enumerate(rows, 1):
        row_started = time.perf_counter()
        if row_started - started + longest > args.budget_s:  # not recorded: an earlier call's row stays
            print(f"row {number}/{len(rows)}: {trainer} {base} checkpointing {checkpointing}: not run, it might end "
                  f"past --budget_s {args.budget_s:g}", flush=True)
            continue
        record = run_row(trainer, base, checkpointing, flags, model, args, context)
        longest = max(longest, time.perf_counter() - row_started)
        write_records(args.results, args.results.with_name("RESULTS-gpu-memory.json"), [record], key, render,
                      (BEGIN, END))  # after each row, so a later failure or a timeout loses nothing measured
        print(f"row {number}/{len(rows)} ({time.perf_counter() - started:.0f} s): {trainer} {base} checkpointing "
              f"{checkpointing}: {cell(record)}", flush=True)


if __name__ == "__main__":
    main()
