"""Peak memory and speed of the trainer on a CPU, and the phase each peak falls in: benchmarks/RESULTS.md.

    python benchmarks/make_full_ssd1b.py /tmp/full-ssd1b --device cpu     # once: random weights, 4.5 GB, 1 min
    python benchmarks/cpu_memory.py --model /tmp/full-ssd1b --label before --trainer_root ../older-checkout
    python benchmarks/cpu_memory.py --model /tmp/full-ssd1b --label after  # this checkout's trainer
    python benchmarks/cpu_memory.py --tiny --label after                  # the plumbing only, in seconds a row

Run the baselines (--label filed, --label before: see BASELINES) and after back to back, one setting at a time
(--mixed_precision, --gradient_checkpointing and --cache_latents each take a subset), so all see the same load on
the machine; --round 2 repeats them in rows of their own. Records go to RESULTS-cpu-memory.json, not RESULTS.json,
whose records run_benchmarks.py renders.

The setting is issue 16's: 128 px, rank 8, batch 1, 8-bit AdamW, 6 steps, one thread (OMP_NUM_THREADS=1, so
torch uses one), one row per --mixed_precision (no, bf16) x gradient checkpointing (off, on) x latent cache (on,
off). The prompt cache has no flag: it is built whenever the text encoders are frozen, and --train_text_encoder
would change the workload, so "latent cache off" is --cache_latents off alone; the prompt cache is on in every row.

Each row is one trainer process, run as a user runs it, from --trainer_root (the checkout whose trainer is
measured: "before" and "after" differ only there). While it runs, this script reads VmRSS and VmHWM (the
kernel's own high-water mark) from /proc/PID/status every 50 ms, and stamps each line the trainer prints with the
time it arrived. The trainer's lines bound its phases:
    load       from the start, Python's imports included, to "loaded the models in ..." (or "loaded the text
               encoders and the VAE in ...", where the UNet loads after the caches)
    caches     to "cached: ..."              (class images; the prompt and latent caches; what they replace let go)
    UNet load  to "loaded the UNet in ..."   (where the trainer prints it)
    set-up     to "N instance photos, ..."   (LoRA, optimizer, accelerate's prepare)
    training   to "steady-state ..."         (every step, and the save after the last)
    exit       to the process's end
The whole run's peak is the kernel's (the child's ru_maxrss, from wait4), so no sampling gap can miss it, and
it falls in the phase during which VmHWM reached it. A phase's own peak is its last VmHWM where VmHWM rose
during it (exact), else its highest VmRSS sample. s/step is the trainer's steady-state report (steps 4 to 6);
the first optimizer step is when the progress bar first shows 1/6, counted from the process's start.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_benchmarks import machine, versions, write_records  # noqa: E402  (the runner's own folder)

ROOT = Path(__file__).resolve().parents[1]
TRAINER = "train_dreambooth_lora_ssd1b.py"
GIB = 2**30
PRECISIONS, CHECKPOINTING, LATENT_CACHE = ["no", "bf16"], ["off", "on"], ["on", "off"]
BASES = {"unquantised": [], "fp8": ["--fp8_base"], "nf4": ["--nf4_base"]}  # how the frozen base is held (issue 36)
ESTIMATE = re.compile(r"^memory estimate: peak (?P<gib>[\d.]+) GiB")  # the trainer's, before any model loads
STEPS, SAMPLE_SECONDS = 6, 0.05
BEGIN, END = "<!-- cpu memory: begin (written by cpu_memory.py) -->", "<!-- cpu memory: end -->"
# The trainer's lines that end each phase, and whether every trainer prints it; "exit" ends with the process.
PHASES = [("load", re.compile(r"^loaded the (models|text encoders and the VAE) in"), False),  # from 51c6b7c on
          ("caches", re.compile(r"^cached: "), True),
          ("UNet load", re.compile(r"^loaded the UNet in"), False),  # before issue 16 the UNet loaded with the rest
          ("set-up", re.compile(r"^\d+ instance photos?\b"), True),
          ("training", re.compile(r"^steady-state "), True),
          ("exit", None, True)]
STEADY = re.compile(r"steady-state (?P<ms>[\d.]+) ms/step over (?P<steps>\d+) steps")
# tqdm's bar, redrawn after each optimizer step; at a second and more a step it shows every one. Before 51c6b7c
# (in the baseline "filed") the bar was "steps" and no line ended the load phase: there load and caches are one
# phase, "caches".
BAR = re.compile(r"^(training|steps):.*\|\s*(?P<step>\d+)/\d+ ")
WARMUP_STEPS = 3  # the trainer's: its steady-state time leaves out steps 1 to 3
# Labels of the rows the others are compared with: the last trainer before the readability issue, which issue 16
# was filed to land after ("filed", 71d69bc: its first step ran under FlopCounterMode), and the last one before
# issue 16's own commits ("before", a688f10).
BASELINES = ["filed", "before"]


def row_flags(precision: str, checkpointing: str, latent_cache: str, resolution: int) -> list[str]:
    return ["--resolution", str(resolution), "--mixed_precision", precision, "--train_batch_size", "1",
            "--rank", "8", "--optimizer", "adamw8bit", "--max_train_steps", str(STEPS),
            "--center_crop",  # the same pixels in every row: with it the latent cache is exact, so it may be on
            "--cache_latents", latent_cache, *(["--gradient_checkpointing"] if checkpointing == "on" else [])]


def trainer_command(model: Path, instance_dir: Path, output_dir: Path, flags: list[str]) -> list[str]:
    return [TRAINER, "--pretrained_model_name_or_path", str(model), "--pretrained_vae_model_name_or_path",
            str(model / "vae"), "--instance_dir", str(instance_dir), "--instance_prompt", "a photo of sks dog",
            "--output_dir", str(output_dir), "--overwrite_output_dir", *flags]


class Output:
    """The child's output, split at newlines and at tqdm's carriage returns, each line stamped on arrival."""

    def __init__(self, stream, log: Path, started: float):
        self.lines, self.started = [], started  # (seconds since start, line)
        self.thread = threading.Thread(target=self.read, args=(stream, log), daemon=True)
        self.thread.start()

    def read(self, stream, log: Path):
        pending = ""
        with open(log, "w") as out:
            while chunk := os.read(stream.fileno(), 65536).decode(errors="replace"):
                out.write(chunk)
                now = time.perf_counter() - self.started
                *complete, pending = re.split(r"[\r\n]", pending + chunk)
                self.lines += [(now, line) for line in complete if line.strip()]
                if BAR.search(pending):  # tqdm ends a redraw with no newline: its "\r" comes with the next one
                    self.lines.append((now, pending))
        if pending.strip():
            self.lines.append((time.perf_counter() - self.started, pending))


def read_process(pid: int) -> tuple[int, int, int, float] | None:
    """(VmRSS, VmHWM, RssAnon) in bytes and the CPU seconds used so far; None once the process has gone. RssAnon
    leaves out mapped file pages, which a load holds while it casts a weights file, and which the kernel may drop
    when memory is short. CPU seconds, unlike wall time, hardly change when other processes share the cores."""
    try:
        status, stat = Path(f"/proc/{pid}/status").read_text(), Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if line.startswith(("VmRSS", "VmHWM", "RssAnon")))
    if len(fields) < 3:  # a zombie has no memory lines
        return None
    utime, stime = stat.rsplit(")", 1)[1].split()[11:13]  # fields 14 and 15, counted after the command's ")"
    return (*(int(fields[name].split()[0]) * 1024 for name in ("VmRSS", "VmHWM", "RssAnon")),
            (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK"))


def run_and_sample(command: list[str], cwd: Path, env: dict, log: Path) -> dict:
    """Run one trainer process; return its output lines, memory samples, exit status and kernel peak."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, *command], cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    output, samples = Output(process.stdout, log, started), []  # samples: (seconds, rss, hwm, anon, cpu seconds)
    while True:
        # wait4, not Popen.poll: it also returns the child's rusage, whose ru_maxrss is the kernel's exact peak
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        if figures := read_process(process.pid):
            samples.append((time.perf_counter() - started, *figures))
        time.sleep(SAMPLE_SECONDS)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    output.thread.join()
    return {"lines": output.lines, "samples": samples, "returncode": process.returncode, "wall": seconds,
            "maxrss": usage.ru_maxrss * 1024, "cpu": usage.ru_utime + usage.ru_stime}  # ru_maxrss: KiB on Linux


def phase_bounds(lines: list[tuple[float, str]], wall: float) -> dict[str, tuple[float, float]]:
    """Each phase's (start, end) in seconds from the process's start, from the trainer's own lines."""
    bounds, start = {}, 0.0
    for name, marker, always in PHASES:
        end = wall if marker is None else next((t for t, line in lines if marker.search(line)), None)
        if end is None and always:
            raise ValueError(f"the trainer printed no line ending its {name} phase ({marker.pattern}); "
                             "has its output changed?")
        if end is not None:
            bounds[name], start = (start, end), end
    return bounds


def phase_peaks(samples: list[tuple], bounds: dict) -> dict[str, int]:
    """Each phase's peak RSS: its last VmHWM where VmHWM rose during it (exact), else its highest VmRSS sample."""
    peaks, hwm_before = {}, 0
    for name, (start, end) in bounds.items():
        inside = [s for s in samples if start < s[0] <= end]
        if not inside:
            continue
        hwm_after = inside[-1][2]
        peaks[name] = hwm_after if hwm_after > hwm_before else max(s[1] for s in inside)
        hwm_before = hwm_after
    return peaks


def peak_phase(samples: list[tuple], bounds: dict, maxrss: int) -> str:
    """The phase during which VmHWM reached the run's peak (exit if it rose after the last sample)."""
    reached = next((s[0] for s in samples if s[2] >= maxrss), None)
    if reached is None:
        return "exit"
    return next(name for name, (start, end) in bounds.items() if start < reached <= end)


def cpu_at(samples: list[tuple], t: float) -> float:
    """The CPU seconds the process had used at time t: the first sample at or after it (50 ms later at most)."""
    return next((s[4] for s in samples if s[0] >= t), samples[-1][4])


def measure(run: dict) -> dict:
    """The row's figures from one sampled run."""
    bounds = phase_bounds(run["lines"], run["wall"])
    steady = next((STEADY.search(line) for _, line in run["lines"] if STEADY.search(line)))
    bar = {}  # step -> when the bar first showed it
    for t, line in run["lines"]:
        if (match := BAR.search(line)) and int(match["step"]) > 0:
            bar.setdefault(int(match["step"]), t)
    first_step, samples = min(bar.items())[1], run["samples"]
    # CPU seconds per step over the steps the trainer's own figure times (after the warm-up, to the last)
    after_warmup = [step for step in bar if step >= WARMUP_STEPS]
    cpu_per_step = None
    if len(after_warmup) > 1:
        low, high = min(after_warmup), max(after_warmup)
        cpu_per_step = (cpu_at(samples, bar[high]) - cpu_at(samples, bar[low])) / (high - low)
    peaks = phase_peaks(samples, bounds)
    peak = max(run["maxrss"], *(s[2] for s in samples))
    peaked_in = peak_phase(samples, bounds, peak)
    if peaked_in == "exit":  # VmHWM rose after the last sample: the exit's own peak
        peaks["exit"] = max(peaks.get("exit", 0), peak)
    return {"peak_gib": peak / GIB, "peak_phase": peaked_in,
            "training_peak_gib": peaks["training"] / GIB, "anon_peak_gib": max(s[3] for s in samples) / GIB,
            "phase_peaks_gib": {name: value / GIB for name, value in peaks.items()},
            "phase_seconds": {name: end - start for name, (start, end) in bounds.items()},
            "s_per_step": float(steady["ms"]) / 1000, "steady_steps": int(steady["steps"]),
            "cpu_s_per_step": cpu_per_step, "first_step_s": first_step,
            "first_step_cpu_s": cpu_at(samples, first_step), "wall": run["wall"], "cpu": run["cpu"],
            "samples": len(samples)}


def trainer_version(trainer_root: Path) -> str:
    """The measured checkout's commit, marked +changes when its trainer differs from that commit's."""
    def git(*argv):
        return subprocess.run(["git", "-C", str(trainer_root), *argv], capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+changes" if git("status", "--porcelain", "--", TRAINER) else "")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def benchmark(setting: tuple[str, str, str], args, model: Path, context: dict) -> dict:
    precision, checkpointing, latent_cache, base, resolution = setting
    resolution = 64 if args.tiny else resolution
    name = f"{args.label}-{precision}-gc_{checkpointing}-latents_{latent_cache}-{base}-{resolution}px"
    command = trainer_command(model, args.instance_dir.resolve(), args.work_dir / name,
                              row_flags(precision, checkpointing, latent_cache, resolution) + BASES[base])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    load_before = load_average()
    run = run_and_sample(command, args.trainer_root, env, args.work_dir / f"{name}.log")
    if run["returncode"]:
        sys.exit(f"the trainer failed (exit {run['returncode']}); its output is in {args.work_dir / f'{name}.log'}")
    estimate = next((float(m["gib"]) for _, line in run["lines"] if (m := ESTIMATE.search(line))), None)
    return {"size": "tiny" if args.tiny else "full", "round": args.round, "label": args.label, "precision": precision,
            "checkpointing": checkpointing, "latent_cache": latent_cache, "base": base, "resolution": resolution,
            "estimate_gib": estimate, **context,
            "trainer": trainer_version(args.trainer_root), "load_average": f"{load_before} -> {load_average()}",
            "command": f"cd {args.trainer_root} && OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 "
                       f"python {shlex.join(command)}",
            **measure(run)}


# ----------------------------------------------------------------------------------------------------------
# RESULTS.md: a table between markers, rows kept per (size, label, setting, machine)
# ----------------------------------------------------------------------------------------------------------

def key(record: dict, *, label: bool = True) -> tuple:
    return (record["size"], record["machine"], record.get("round", 1), record["precision"], record["checkpointing"],
            record["latent_cache"], record.get("base", "unquantised"), record.get("resolution", 128),
            *([record["label"]] if label else []))


def versus(record: dict, before: dict | None) -> str:
    """An after row against a baseline row of the same setting: the ratios the issue's targets name, wall (CPU)."""
    if before is None or record is before:
        return ""

    def ratio(name):
        wall = record[name] / before[name]
        cpu_name = {"s_per_step": "cpu_s_per_step", "first_step_s": "first_step_cpu_s"}[name]
        cpu = f" ({record[cpu_name] / before[cpu_name]:.2f})" if record[cpu_name] and before[cpu_name] else ""
        return f"x{wall:.2f}{cpu}"

    return (f"peak x{record['peak_gib'] / before['peak_gib']:.2f}, first step {ratio('first_step_s')}, "
            f"s/step {ratio('s_per_step')}")


def cpu(seconds: float | None) -> str:
    return f" ({seconds:.2f})" if seconds is not None else ""


def row(record: dict, baselines: list[dict]) -> str:
    return (f"| {record['size']} | {record.get('round', 1)} | {record['label']} ({record['trainer']}) "
            f"| {record['precision']} | {record.get('base', 'unquantised')} | {record.get('resolution', 128)} "
            f"| {record['checkpointing']} | {record['latent_cache']} | {record['peak_gib']:.2f} "
            f"| {estimate(record)} "
            f"| {record['peak_phase']} | {record['anon_peak_gib']:.2f} | {record['training_peak_gib']:.2f} "
            f"| {record['peak_gib'] - record['training_peak_gib']:.2f} "
            f"| {record['s_per_step']:.2f}{cpu(record['cpu_s_per_step'])} "
            f"| {record['first_step_s']:.1f}{cpu(record['first_step_cpu_s'])} | {record['wall']:.0f} "
            f"| {'; '.join(compared(record, b) for b in baselines)} |")


def estimate(record: dict) -> str:
    """The trainer's own estimate, and its share of the measured peak; the trainers before issue 36 printed none."""
    if record.get("estimate_gib") is None:
        return "n/a"
    return f"{record['estimate_gib']:.2f} ({record['estimate_gib'] / record['peak_gib']:.2f})"


def compared(record: dict, baseline: dict) -> str:
    return f"vs {baseline['label']}: {versus(record, baseline)}"


def details(record: dict) -> list[str]:
    peaks = ", ".join(f"{name} {gib:.2f}" for name, gib in record["phase_peaks_gib"].items())
    seconds = ", ".join(f"{name} {s:.1f}" for name, s in record["phase_seconds"].items())
    return [f"- **{record['size']}, round {record.get('round', 1)}, {record['label']}: {record['precision']}, "
            f"base {record.get('base', 'unquantised')}, {record.get('resolution', 128)} px, "
            f"checkpointing {record['checkpointing']}, latent cache {record['latent_cache']}** "
            f"({record['date']}, load average {record['load_average']}). Peak RSS by phase (GiB): {peaks}. "
            f"Seconds by phase: {seconds}.", "", "  ```bash", f"  {record['command']}", "  ```", ""]


def render(records: list[dict]) -> str:
    order = {"full": 0, "tiny": 1}
    records = sorted(records, key=lambda r: (order[r["size"]], r["machine"], r.get("round", 1),
                                             PRECISIONS.index(r["precision"]),
                                             list(BASES).index(r.get("base", "unquantised")), r.get("resolution", 128),
                                             CHECKPOINTING.index(r["checkpointing"]),
                                             LATENT_CACHE.index(r["latent_cache"]),
                                             BASELINES.index(r["label"]) if r["label"] in BASELINES else 9,
                                             r["label"]))
    baselines = {(key(r, label=False), r["label"]): r for r in records if r["label"] in BASELINES}
    lines = [BEGIN, "", "| size | round | trainer | precision | base | px | checkpointing | latent cache "
             "| peak RSS, whole run (GiB) | estimate before loading (GiB, / peak) | phase of the peak "
             "| anonymous peak (GiB) | training peak (GiB) | above training (GiB) | s/step, wall (CPU) "
             "| first optimizer step (s), wall (CPU) | wall (s) | after / filed, after / before, wall (CPU) |",
             "|---" * 18 + "|"]
    for r in records:  # a baseline row is compared with nothing; another with each baseline of its setting
        setting = key(r, label=False)
        lines.append(row(r, [] if r["label"] in BASELINES else
                         [baselines[setting, b] for b in BASELINES if (setting, b) in baselines]))
    lines += [""]
    for machine_, versions_ in dict.fromkeys((r["machine"], json.dumps(r["versions"])) for r in records):
        packages = ", ".join(f"{name} {version}" for name, version in json.loads(versions_).items())
        lines += [f"Machine: {machine_}. Versions: {packages}.", ""]
    lines += ["Peak RSS and seconds by phase, load and the exact command of each row:", ""]
    for record in records:
        lines += details(record)
    return "\n".join([*lines, END])


def write_results(results: Path, new: list[dict]) -> None:
    """Keep every record in RESULTS-cpu-memory.json beside the markdown, replacing those of the same key, and
    rewrite the table between this script's markers; the prose and run_benchmarks.py's table are left alone."""
    write_records(results, results.with_name("RESULTS-cpu-memory.json"), new, key, render, (BEGIN, END))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="a folder written by make_full_ssd1b.py (with --tiny: optional, a "
                                              "tiny model's folder, else one is made in --work_dir)")
    p.add_argument("--tiny", action="store_true", help="the tiny model at 64 px: the plumbing, not the figures")
    p.add_argument("--label", default="after", help="names the rows: 'filed' and 'before' rows are what others are "
                                                    "compared with (default: after)")
    p.add_argument("--trainer_root", type=Path, default=ROOT,
                   help="the checkout whose trainer runs (default: this one)")
    p.add_argument("--instance_dir", type=Path, default=ROOT / "examples" / "dog")
    p.add_argument("--work_dir", type=Path, default=ROOT / "work_dirs" / "cpu_memory",
                   help="output dirs and logs; each row's output dir is replaced")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    p.add_argument("--round", type=int, default=1,
                   help="numbers a repeat of the same rows; each round's after rows are compared with its before rows")
    p.add_argument("--mixed_precision", nargs="+", choices=PRECISIONS, default=PRECISIONS)
    p.add_argument("--gradient_checkpointing", nargs="+", choices=CHECKPOINTING, default=CHECKPOINTING)
    p.add_argument("--cache_latents", nargs="+", choices=LATENT_CACHE, default=LATENT_CACHE)
    p.add_argument("--base", nargs="+", choices=list(BASES), default=["unquantised"])
    p.add_argument("--resolution", nargs="+", type=int, default=[128])
    args = p.parse_args(argv)
    if not args.tiny and not (args.model and (args.model / "model_index.json").is_file()):
        p.error("--model must be a folder written by benchmarks/make_full_ssd1b.py (or pass --tiny)")
    if not (args.trainer_root / TRAINER).is_file():
        p.error(f"--trainer_root {args.trainer_root} has no {TRAINER}")
    args.trainer_root, args.work_dir = args.trainer_root.resolve(), args.work_dir.resolve()
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:  # --tiny without a folder
        sys.path.insert(0, str(ROOT / "examples"))
        from make_tiny_ssd1b import make_tiny_ssd1b

        model = make_tiny_ssd1b(args.work_dir / "tiny-ssd1b")
    context = {"machine": f"{machine()}, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / GIB:.0f} GiB",
               "date": datetime.date.today().isoformat(), "versions": versions()}
    print(json.dumps(context))
    for setting in itertools.product(args.mixed_precision, args.gradient_checkpointing, args.cache_latents, args.base,
                                     args.resolution):
        record = benchmark(setting, args, model.resolve(), context)
        write_results(args.results, [record])  # after each row, so a later failure loses nothing measured
        print(json.dumps({k: v for k, v in record.items() if k not in ("versions", "command")}), flush=True)


if __name__ == "__main__":
    main()
