"""Profile the real trainer's steps with torch.profiler: where a step's time goes, before optimising it.

    python benchmarks/profile_step.py --out work_dirs/profile -- --pretrained_model_name_or_path MODEL ... (trainer flags)

The trainer runs in this process, as `python train_dreambooth_lora_ssd1b.py <flags>` would run it; the only change
is that each call of its training_step() marks a profiler step. Steps 1 to --skip are left alone (they warm up the
allocator and kernels); the next --steps are recorded. Writes
OUT/table.txt (ops by self time on the device, or on the CPU without a GPU), OUT/trace.json.gz (open it in
Perfetto or chrome://tracing) and prints the table. Give the trainer more than skip + steps steps
(--max_train_steps), so no save or validation falls inside the record.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_dreambooth_lora_ssd1b as trainer  # noqa: E402
from dreambooth_kit import messages


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("work_dirs/profile"))
    p.add_argument("--skip", type=int, default=3, help="steps before recording (warm-up)")
    p.add_argument("--steps", type=int, default=3, help="steps recorded")
    p.add_argument("--rows", type=int, default=30, help="rows of the table")
    p.add_argument("trainer_flags", nargs=argparse.REMAINDER, help="after --: the trainer's own flags")
    args = p.parse_args(argv)
    args.trainer_flags = [f for f in args.trainer_flags if f != "--"]
    return args


def profiled(step_function, profiler):
    """training_step, with a profiler step marked at each call: a step's forward, backward and optimizer
    update lie between two calls."""
    def step(*args, **kwargs):
        profiler.step()
        with record_function("training_step (forward and loss)"):
            return step_function(*args, **kwargs)
    return step


def main(argv=None):
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    on_gpu = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_gpu else [])]
    # profiler step 0 is everything before the first training step; step k is training step k. Waiting
    # through 0..skip-1 and warming the profiler up on step skip records steps skip+1 .. skip+steps.
    plan = schedule(wait=args.skip, warmup=1, active=args.steps, repeat=1)
    with profile(activities=activities, schedule=plan, profile_memory=on_gpu) as profiler:
        trainer.training_step = profiled(trainer.training_step, profiler)
        try:
            trainer.main(args.trainer_flags)
        except messages.UserError as error:
            sys.exit(f"error: {error}")
    sort_by = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort_by, row_limit=args.rows, max_name_column_width=60)
    (args.out / "table.txt").write_text(table)
    trace = args.out / "trace.json"
    profiler.export_chrome_trace(str(trace))
    with open(trace, "rb") as raw, gzip.open(f"{trace}.gz", "wb") as packed:  # a tenth of the size
        shutil.copyfileobj(raw, packed)
    trace.unlink()
    print(table)
    print(f"recorded {args.steps} steps after {args.skip}; table and trace in {args.out}")


if __name__ == "__main__":
    main()
