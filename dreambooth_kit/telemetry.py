"""Where the time goes (load, class images, caches, training), the steady-state time per step, and the peak memory."""

import collections
import contextlib
import gc
import resource
import time

import torch

from .messages import counted

WARMUP_STEPS = 3  # steps left out of the steady-state time per step (allocator, kernels and caches warm up)


class Clock:
    """Where the run's time goes: its phases, and training timed in windows that end where the loop reads the
    losses back anyway (one host-device sync), so the device is never waited on just to time it."""

    def __init__(self):
        self.phases, self.windows = collections.defaultdict(float), []  # windows: (first step, steps, seconds)
        self.started, self.peak_before_training, self.current = time.perf_counter(), 0, None

    @contextlib.contextmanager
    def phase(self, name):
        started, self.current = time.perf_counter(), name  # current: what a stop names (left where one raised)
        yield
        self.phases[name] += time.perf_counter() - started
        self.current = None

    def lap(self, accelerator, pending, step):
        """The window's losses (each step's mean over processes), read back in one sync, and its duration."""
        losses = accelerator.gather(torch.stack(pending)).view(accelerator.num_processes, -1).mean(0).tolist()
        seconds = time.perf_counter() - self.started
        self.windows.append((step - len(losses) + 1, len(losses), seconds))
        self.phases["training"] += seconds
        self.started = time.perf_counter()
        return losses


def report(accelerator, clock, start_step, estimate=None):
    """The closing line: steady-state time per step (warm-up, saving and validation left out), peak memory beside
    the estimate made before any model loaded (bytes; None where there was none), and where the run's time went.
    FLOPs and MFU are measured by benchmarks/, off the training path."""
    steady = [(n, s) for first, n, s in clock.windows if first > start_step + WARMUP_STEPS] or \
        [(n, s) for _, n, s in clock.windows]
    ms_per_step = 1000 * sum(s for _, s in steady) / sum(n for n, _ in steady)
    estimated = f"estimated {estimate / 2**30:.2f} GiB" if estimate else ""
    if torch.cuda.is_available():
        peak_gib = torch.cuda.max_memory_allocated() / 2**30
        run_gib = max(peak_gib, clock.peak_before_training / 2**30)
        memory = (f"peak GPU memory {peak_gib:.2f} GiB in training ({run_gib:.2f} GiB in the whole run"
                  f"{'; ' + estimated if estimated else ''})")
    else:
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        memory = f"peak RSS {peak_gib:.2f} GiB" + (f" ({estimated})" if estimated else "")
    accelerator.print(f"steady-state {ms_per_step:.1f} ms/step over {sum(n for n, _ in steady)} steps; {memory}\n"
                      "time: " + ", ".join(f"{name} {sec:.1f} s" for name, sec in clock.phases.items()))
    accelerator.log({"ms_per_step": ms_per_step, "peak_memory_gib": peak_gib,
                     **{f"seconds/{name}": sec for name, sec in clock.phases.items()}})
    return ms_per_step


def release_memory():
    """Give back what was let go: Python's cycles first, then the GPU's cached blocks."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def describe_run(accelerator, args, num_instance_images, num_class_images):
    """What the run is about to do, in one line: photos, class images, steps and the effective batch."""
    effective = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    processes = counted(accelerator.num_processes, "process", "processes")
    accelerator.print(f"{counted(num_instance_images, 'instance photo')}, {counted(num_class_images, 'class image')}; "
                      f"{counted(args.max_train_steps, 'step')}, effective batch {effective} = "
                      f"{args.train_batch_size} per device x {processes} x {args.gradient_accumulation_steps} "
                      "accumulation")

