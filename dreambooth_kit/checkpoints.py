"""Resumable state: what a resumed run must match (flags, photos, base model), the integrity of each state folder,
saving and finding it, and the NaN guard."""

import dataclasses
import functools
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import accelerate.utils
import huggingface_hub
import numpy as np
import safetensors.torch
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from .artifacts import (
    STATE_PREFIX,
    TRAINER_STATE,
    file_sha256,
    finished_adapters,
    partial_dir,
    publish,
    ran,
    remove_partial_dirs,
    step_of,
)
from .checks import OPTIMIZER_FLAGS, SECRET_FLAGS, effective_learning_rates
from .exporters import save_adapters
from .imaging import mask_path
from .messages import UserError, one_line, say, warn
from .pipeline import unwrap, weight_files


def check_resume(args, current):
    """The state to resume from, checked against this run's settings (`current`, flags and what they came to);
    None for a fresh run."""
    output_dir = current["output_dir"]
    if not args.resume_from_checkpoint:
        return None
    state = find_resume_state(output_dir, args.resume_from_checkpoint)
    if state is None:
        say(f"no resumable state in {output_dir} yet: starting a new run")
        return None
    saved = read_trainer_state(state)
    verify_state_files(state, saved)
    if saved["step"] != step_of(state):  # a copy renamed, or a resealed edit: which step it holds is unknown
        raise UserError(f"{state / TRAINER_STATE} records {saved['step']} steps, but {state.name} is the state after "
                        f"{step_of(state)}: delete {state} to resume from the state before it, or start a new run")
    saved_settings = {"fp8_base": False, "nf4_base": False, **ran(saved["settings"])}  # older: unquantised
    check_state_loads(state, saved_settings["train_text_encoder"], saved_settings["rank"])
    check_same_settings(state, saved_settings, current, args.accept_changed_settings)
    if saved["step"] >= args.max_train_steps:
        raise UserError(f"{state} has already done {saved['step']} steps: pass a larger --max_train_steps "
                        "to extend the run")
    check_same_schedule(state, saved_settings, args)
    return state


def read_trainer_state(state):
    """A state folder's trainer_state.json: {"step": int, "settings": dict}. Anything else (a truncated copy, an
    edit) is refused naming the file, rather than resuming from a state whose step is unknown."""
    file = state / TRAINER_STATE
    try:
        saved = json.loads(file.read_text(encoding="utf-8"))
        valid = (type(saved["step"]) is int and isinstance(saved["settings"], dict)  # a bool is an int to isinstance
                 and isinstance(saved["files"], dict))
    except (OSError, ValueError, TypeError, KeyError):  # ValueError: not UTF-8 or not JSON; TypeError: not a dict
        valid = False
    if not valid:
        raise UserError(f"{file} is damaged (not the JSON with step and settings that this trainer writes): delete "
                        f"{state}, or resume from another {STATE_PREFIX}stepN folder")
    return saved


# What a resumed run must share with its state: the first ones shape the saved tensors themselves, the others
# what the run learns (--accept_changed_settings accepts a change of those)
STATE_SHAPING_FLAGS = ["pretrained_model_name_or_path", "rank", "lora_alpha", "train_text_encoder", "use_dora",
                       "optimizer"]


TRAINING_FLAGS = ["pretrained_vae_model_name_or_path", "revision", "variant", "instance_dir", "instance_prompt",
                  "caption_extension", "with_prior_preservation", "class_prompt", "num_class_images",
                  "prior_loss_weight", "prior_target", "caption_dropout", "masked_loss", "mask_floor", "resolution",
                  "buckets", "center_crop", "random_flip", "train_batch_size", "lora_dropout",
                  "learning_rate", "text_encoder_lr", "scale_lr", "adam_beta1", "adam_beta2", "adam_weight_decay",
                  "adam_epsilon", "max_grad_norm", "gradient_accumulation_steps", "snr_gamma", "noise_offset", "seed",
                  "mixed_precision", "fp8_base", "nf4_base", "instance_data_sha256", "model_fingerprint",
                  *OPTIMIZER_FLAGS["prodigy"]]


# what a fingerprint covers: every part that training reads from the base model folder
MODEL_PARTS = ["unet", "text_encoder", "text_encoder_2", "vae", "tokenizer", "tokenizer_2", "scheduler"]


FINGERPRINT_SAMPLES = 16  # blocks of 4 KiB read from each weight file: a retrained model of the same shapes differs


def instance_data_sha256(images, prompts, instance_prompt):
    """One checksum of the photos' names and bytes, their own captions (--instance_prompt is compared as a flag)
    and their masks: a resume notices a photo or mask swapped or edited in the folder."""
    digest = hashlib.sha256()
    for path, prompt in zip(images, prompts):
        entry = [path.name, file_sha256(path), prompt if prompt != instance_prompt else None]
        if mask_path(path).is_file():  # only masks add to it: a run without them keeps its checksum
            entry.append(file_sha256(mask_path(path)))
        digest.update(json.dumps(entry).encode())
    return digest.hexdigest()


def model_fingerprint(model, vae_model, revision, variant):
    """What each part of the base model is, cheaply: a local folder's config, tokenizer and scheduler files by
    content, and its weight files by name, size, safetensors header (every tensor's name, shape, dtype and offset)
    and 16 sampled blocks of 4 KiB (a few reads, where the weights are gigabytes). A Hub id's part is the commit its
    revision resolved to in the local cache, which names every file's content; None if it is not cached."""
    fingerprint = {}
    for part in MODEL_PARTS:
        if part == "vae" and vae_model:
            fingerprint[part] = part_fingerprint(vae_model, ".", "config.json", None, None)
        else:
            fingerprint[part] = part_fingerprint(model, part, "model_index.json", revision, variant)
    return fingerprint


def part_fingerprint(name, sub, index, revision, variant):
    folder = Path(name) / sub
    if not Path(name).is_dir():  # check_model_source has fetched (or found cached) the index: its snapshot's commit
        cached = huggingface_hub.try_to_load_from_cache(name, index, revision=revision)
        return f"{name}@{Path(cached).parent.name}" if isinstance(cached, str) else None
    weights = set(weight_files(folder, variant))
    digest = hashlib.sha256()
    for file in sorted(folder.iterdir()) if folder.is_dir() else []:
        if file.name in weights:
            entry = [file.name, file.stat().st_size, weight_file_sample_sha256(file)]
        elif file.suffix in (".json", ".txt") and file.is_file():  # configs, vocabularies, merges
            entry = [file.name, file_sha256(file)]
        else:
            continue
        digest.update(json.dumps(entry).encode())
    return digest.hexdigest()


def weight_file_sample_sha256(file):
    """The SHA-256 of a weight file's safetensors header (8 bytes of length, then JSON naming every tensor) and of
    FINGERPRINT_SAMPLES blocks spread evenly over the file."""
    digest = hashlib.sha256()
    size = file.stat().st_size
    with open(file, "rb") as f:
        if file.suffix == ".safetensors":
            head = f.read(8)
            digest.update(head + f.read(min(int.from_bytes(head.ljust(8, b"\0"), "little"), size)))
        for k in range(FINGERPRINT_SAMPLES):
            f.seek(size * k // FINGERPRINT_SAMPLES)
            digest.update(f.read(4096))
    return digest.hexdigest()


def fingerprint_changes(was, now):
    """The parts of the base model whose fingerprints differ, where both are known (a Hub model not in the cache
    has none)."""
    was, now = was or {}, now or {}
    return [part for part in MODEL_PARTS if was.get(part) and now.get(part) and was[part] != now[part]]


def moved_model(key, saved, current):
    """A model folder passed from another place (or a Hub revision spelled another way) whose files are the ones
    the state was trained on, by their fingerprint: moved or copied, not changed."""
    if key not in ("pretrained_model_name_or_path", "pretrained_vae_model_name_or_path", "revision"):
        return False
    was, now = saved.get("model_fingerprint") or {}, current.get("model_fingerprint") or {}
    same_kind = key == "revision" or bool(saved.get(key)) == bool(current[key])  # the model's own VAE is no move
    return same_kind and all(was.get(p) for p in MODEL_PARTS) and not fingerprint_changes(was, now)


def describe_change(key, was, now):
    if key == "instance_data_sha256":
        return "the instance photos, their captions or their masks (put them back as they were)"
    if key == "model_fingerprint":
        parts = fingerprint_changes(was, now)
        hub = [(was[p].rpartition("@"), now[p].rpartition("@")) for p in parts if "@" in was[p] and "@" in now[p]]
        if hub:  # the same id and revision, resolved to another commit: the repo moved on
            (name, _, then), (_, _, commit) = hub[0]
            return (f"the base model {name} (its revision now resolves to commit {commit[:12]}, not {then[:12]}; "
                    f"pass --revision {then} to resume on the files it was trained on)")
        return (f"the base model's {', '.join(parts)} (changed since the state was saved: its config, tokenizer or "
                "weight files differ; put the model back as it was)")
    if key == "buckets":  # compared as parsed, so a list spelled another way is the same buckets
        return f"the aspect-ratio buckets {was} (now {now})"
    return f"--{key} {was} (now {now})"


def check_same_settings(state, saved, current, accept_changed_settings):
    """Refuse a resume whose settings differ from its state's, listing every difference in one line."""
    for key in [*STATE_SHAPING_FLAGS, *TRAINING_FLAGS]:
        if moved_model(key, saved, current) and saved.get(key) != current[key]:
            say(f"--{key} {current[key]} (was {saved.get(key)}) holds the same base model files, by their "
                "fingerprint: resuming")
    for key in STATE_SHAPING_FLAGS:
        if saved.get(key) != current[key] and not moved_model(key, saved, current):
            differ = (" (whose files differ from those it was trained on, by their fingerprint)"
                      if key == "pretrained_model_name_or_path"
                      and fingerprint_changes(saved.get("model_fingerprint"), current["model_fingerprint"]) else "")
            raise UserError(f"{state} was trained with --{key} {saved.get(key)}, not {current[key]}{differ}: resume "
                            "with the same flags")
    changed = [describe_change(key, saved[key], current[key]) for key in TRAINING_FLAGS
               if not same_setting(key, saved, current)]
    if changed and not accept_changed_settings:
        raise UserError(f"{state} was trained with other settings: {', '.join(changed)}; resume with the same flags, "
                        "or pass --accept_changed_settings to go on with the new ones")
    if changed:
        say(f"resuming with changed settings, as --accept_changed_settings asks: {', '.join(changed)}")


def same_setting(key, saved, current):
    if key == "model_fingerprint":
        return not fingerprint_changes(saved[key], current[key])
    return saved[key] == current[key] or moved_model(key, saved, current)


def state_record(folder, step, settings):
    """trainer_state.json's content: the step, the settings, a checksum of every file, and a seal over all three,
    so a corrupted, truncated, swapped or edited file is found before any model loads."""
    files = {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    record = {"step": step, "settings": settings, "files": files}
    return {**record, "seal": seal(record)}


def seal(record):
    fields = {key: record.get(key) for key in ("step", "settings", "files")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def verify_state_files(state, saved):
    """Every file of a state as it was saved, and nothing added; refused in one line naming what differs."""
    fix = f"delete {state} to resume from the state before it, or start a new run"
    if saved.get("seal") != seal(saved):
        raise UserError(f"{state / TRAINER_STATE} was changed after it was saved (its seal does not match): {fix}")
    on_disk = {p.relative_to(state).as_posix() for p in state.rglob("*") if p.is_file()} - {TRAINER_STATE}
    for name in sorted(on_disk | set(saved["files"])):
        if name not in saved["files"]:
            raise UserError(f"{state} holds {name}, which it was not saved with: {fix}")
        if name not in on_disk or file_sha256(state / name) != saved["files"][name]:
            raise UserError(f"{state / name} is {'missing' if name not in on_disk else 'corrupt'} (its checksum "
                            f"does not match the one saved): {fix}")


# accelerate's state files that resume reads with torch.load(weights_only=True), by name, and the keys each holds
TORCH_STATE_FILES = {"optimizer.bin": ("state", "param_groups"), "scheduler.bin": (), "scaler.pt": (),
                     "random_states_*.pkl": ("random_state", "numpy_random_seed", "torch_manual_seed")}


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6: a zip; anything else is no state accelerate wrote


def check_state_loads(state, train_text_encoder, rank):
    """Every file of a state loads as what resume will read, before any model loads: its seal is unkeyed, so a
    file swapped with the seal recomputed (a foreign pickle, a pickled optimizer) passes verify_state_files.
    The loads map the files (mmap) rather than read their tensors."""
    fix = f"delete {state} to resume from the state before it, or start a new run"
    needed = [f"lora_{i}.safetensors" for i in range(3 if train_text_encoder else 1)]
    for name in [*needed, "optimizer.bin", "scheduler.bin", "random_states_0.pkl"]:
        if not (state / name).is_file():
            raise UserError(f"{state} has no {name}, which resume reads: {fix}")
    for file in sorted(state.iterdir()):
        problem = state_file_problem(file, needed, rank)
        if problem:
            raise UserError(f"{file} {problem}: {fix}")
    saved_processes = len(list(state.glob("random_states_*.pkl")))
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > saved_processes:  # accelerate would skip the missing ones with an info log only
        warn(f"{state} holds the RNG states of {saved_processes} process(es), this run has {processes}: the others "
             "start from fresh RNG states, so the resume is not exact")


def state_file_problem(file, lora_files, rank):
    """What keeps one file of a state from loading as resume reads it, or None."""
    kind = next((pattern for pattern in TORCH_STATE_FILES if file.match(pattern)), None)
    if file.name in lora_files:
        try:
            with safe_open(str(file), framework="pt") as weights:
                shapes = {key: weights.get_slice(key).get_shape() for key in weights.keys()}
        except (SafetensorError, OSError) as e:
            return f"is not a readable safetensors file ({one_line(e)[:120]})"
        # LoRA's down (A) and up (B) matrices are rank x in and out x rank: a header read, no tensor
        wrong = [key for key, shape in shapes.items() if len(shape) == 2 and (
            ("lora_A" in key and shape[0] != rank) or ("lora_B" in key and shape[1] != rank))]
        if not any("lora_A" in key for key in shapes) or wrong:
            return (f"holds LoRA tensors of another rank than the state's {rank} (e.g. {wrong[0]})" if wrong
                    else "holds no LoRA tensors")
        return None
    if kind is None:
        return None  # a file resume does not read: the seal covers it
    with open(file, "rb") as f:
        magic = f.read(4)
    if magic != ZIP_MAGIC:
        return f"is not a torch.save file as accelerate writes it (it begins {magic!r}, not a zip's {ZIP_MAGIC!r})"
    try:
        content = accelerate.utils.load(file, map_location="cpu", mmap=True)  # weights_only=True, as resume loads it
    except pickle.UnpicklingError as e:  # torch names the first global it refused, deep in a long message
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"a pickled {found[1]}" if found else "a pickle"
        return f"holds {what}, not only tensors and plain values, so it was not loaded (nothing in it ran)"
    except Exception as e:  # noqa: BLE001 - whatever torch says of a damaged zip, it is named, never a traceback
        return f"does not load ({type(e).__name__}: {one_line(e)[:120]})"
    missing = [key for key in TORCH_STATE_FILES[kind] if not (isinstance(content, dict) and key in content)]
    if not isinstance(content, dict) or missing:
        what = f"no {', '.join(missing)}" if isinstance(content, dict) else f"a {type(content).__name__}"
        return f"holds {what}, not the {kind.replace('*', 'N')} that accelerate writes"
    return rng_problem(content) if kind.startswith("random_states") else None


def rng_problem(states):
    """Whether the RNG states set, tried and then undone: accelerate skips RNG states that do not set with only an
    info log, and the resume would not be exact."""
    before = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        random.setstate(states["random_state"])
        np.random.set_state(states["numpy_random_seed"])
        torch.set_rng_state(states["torch_manual_seed"])
    except Exception as e:  # noqa: BLE001 - TypeError, ValueError, RuntimeError: whichever, named
        return (f"holds RNG states that do not set ({type(e).__name__}: {one_line(e)[:120]}), so the resume would "
                "not be exact")
    finally:
        random.setstate(before[0])
        np.random.set_state(before[1])
        torch.set_rng_state(before[2])
    return None


def check_same_schedule(state, saved, args):
    """A resumed run keeps its learning-rate curve. Only a curve that does not depend on the run's length
    (constant, constant_with_warmup) may be extended; a cosine or linear one would bend mid-run."""
    keys = ["lr_scheduler", "lr_warmup_steps"]
    if args.lr_scheduler not in ("constant", "constant_with_warmup"):
        keys.append("max_train_steps")
    changed = [key for key in keys if saved.get(key) != getattr(args, key)]
    if changed:
        was = " ".join(f"--{key} {saved.get(key)}" for key in keys)
        raise UserError(f"{state} was trained with {was}: changing {', '.join('--' + k for k in changed)} would "
                        f"bend its learning-rate curve mid-run; resume with those flags, or start a new run in "
                        "another --output_dir (only constant schedules can be extended)")


def save_lora_hook(accelerator, models, weights, output_dir):
    """accelerate's save_state hook: store the LoRA weights only, not the frozen multi-GB base model."""
    if accelerator.is_main_process:
        for i, model in enumerate(models):
            state = get_peft_model_state_dict(unwrap(accelerator, model), save_embedding_layers=False)
            safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()},
                                        f"{output_dir}/lora_{i}.safetensors")
    weights.clear()


def load_lora_hook(accelerator, models, input_dir):
    """accelerate's load_state hook: the LoRA weights back into each model; the base weights are untouched."""
    for i, model in enumerate(models):
        file = Path(input_dir) / f"lora_{i}.safetensors"
        fix = f"delete {input_dir} to resume from the state before it, or start a new run"
        try:
            result = set_peft_model_state_dict(unwrap(accelerator, model), safetensors.torch.load_file(file))
        except RuntimeError as e:  # a size mismatch: check_state_loads compares ranks, not every module's width
            raise UserError(f"{file} does not fit the model ({one_line(e)}): {fix}") from None
        # loaded with strict=False: a LoRA tensor the model lacks, or one the file lacks, would go without a word
        unexpected = list(result.unexpected_keys)
        missing = [key for key in result.missing_keys if "lora_" in key]
        if unexpected or missing:
            which, example = ("holds tensors the model has no place for", unexpected) if unexpected \
                else ("lacks LoRA tensors of the model", missing)
            raise UserError(f"{file} {which} ({len(example)}, e.g. {example[0]}), so it is not this run's: {fix}")
    models.clear()


def save_resumable_state(accelerator, output_dir, step, settings):
    """accelerate's save_state (LoRA, optimizer with its 8-bit states, scheduler, scaler, every RNG) into
    state-stepN/, written hidden and renamed into place. Every process takes part."""
    final = Path(output_dir) / f"{STATE_PREFIX}step{step - 1}"
    tmp = partial_dir(final)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / TRAINER_STATE).write_text(json.dumps(state_record(tmp, step, settings), indent=2))
        publish(tmp, final)
    accelerator.wait_for_everyone()
    return final


def complete_states(output_dir):
    """Resumable states by step, oldest first; a folder without its trainer_state.json is not one, nor is one
    not named state-stepN. Sorted by name, which save_resumable_state derives from the step: pruning reads no
    file that could be damaged."""
    states = [p for p in Path(output_dir).glob(f"{STATE_PREFIX}step*") if step_of(p) and (p / TRAINER_STATE).is_file()]
    return sorted(states, key=step_of)


def prune_states(output_dir, keep):
    """Keep the newest `keep` resumable states; adapters are never deleted."""
    for old in complete_states(output_dir)[:-keep]:
        shutil.rmtree(old)


def find_resume_state(output_dir, resume):
    """The state folder to resume from: a path (a stepN adapter dir maps to its state), or the newest complete
    one for 'latest' (None when there is none yet)."""
    if resume == "latest":
        states = complete_states(output_dir)
        refuse_damaged_newer_states(output_dir, states[-1] if states else None)
        return states[-1] if states else None
    path = Path(resume)
    if not path.exists() and len(path.parts) == 1:  # a bare name, as diffusers' script takes: in the output dir
        path = Path(output_dir) / path
    if not (path / TRAINER_STATE).is_file() and (path.parent / f"{STATE_PREFIX}{path.name}").is_dir():
        path = path.parent / f"{STATE_PREFIX}{path.name}"
    if not (path / TRAINER_STATE).is_file():
        raise UserError(f"{resume} is not a resumable checkpoint (no {TRAINER_STATE}): pass a "
                        f"{STATE_PREFIX}stepN folder of the output dir, or 'latest'")
    if step_of(path) is None:  # its step is read from its name, as for every state of the output dir
        raise UserError(f"{path} is not named {STATE_PREFIX}stepN, as the trainer names the states it writes: "
                        f"rename it to {STATE_PREFIX}step<its step - 1>, or pass 'latest'")
    return path


def refuse_damaged_newer_states(output_dir, newest):
    """'latest' never falls back past a state-stepN that is not whole (its trainer_state.json, written last, is
    gone: deleted or damaged; a save cut short leaves only a hidden .partial folder): that state's step and
    settings are unknown, so whether its adapters are this run's is too. Named, with the choices, in one line."""
    complete = complete_states(output_dir)
    newer = [p for p in Path(output_dir).glob(f"{STATE_PREFIX}step*")
             if step_of(p) and p not in complete and (newest is None or step_of(p) > step_of(newest))]
    if not newer:
        return
    damaged = max(newer, key=step_of)
    what = f"has no {TRAINER_STATE} (deleted or damaged)" if damaged.is_dir() else "is not a folder"
    then = f"'latest' resumes from {newest.name}, the state before it" if newest else "the run starts anew"
    raise UserError(f"--resume_from_checkpoint latest: {damaged} {what}, so its step and settings are unknown, and "
                    f"'latest' does not fall back past it without a word: delete it (or move it out of "
                    f"{output_dir}), then {then}")


def refuse_non_finite(losses, step, output_dir, learning_rate):
    """Stop at the first nan or inf loss, naming its step exactly (the window's losses end at `step`)."""
    for offset, value in enumerate(losses):
        if not math.isfinite(value):
            raise UserError(f"the loss became {value} at step {step - len(losses) + 1 + offset}, so training "
                            f"stopped and nothing since was saved; {last_good_adapters(output_dir)}. Likely "
                            "fp16 overflow: use --mixed_precision bf16, or a lower --learning_rate (now "
                            f"{learning_rate})")


def last_good_adapters(output_dir):
    finished = finished_adapters(output_dir)
    return f"the last good adapters are in {finished[-1]}" if finished else "no adapters were saved yet"


def run_settings(args, settings, step=None, num_processes=1):
    """run_settings.json: the flags as typed, and under "derived" what they came to (defaults, absolute model
    folders, the photos' checksum, the learning rates after --scale_lr). infer.py rebuilds the run's pipeline from
    it without repeating flags; a resume compares it with its state's."""
    unet_lr, text_encoder_lr = effective_learning_rates(args, num_processes)
    flags = {k: ("<hidden>" if k in SECRET_FLAGS and v else v) for k, v in vars(args).items()}
    derived = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(settings).items()
               if k != "command"}
    derived.update(num_processes=num_processes, effective_learning_rate=unet_lr,
                   effective_text_encoder_lr=text_encoder_lr)
    record = {**flags, "derived": derived, "step": step, "trainer": "train_dreambooth_lora_ssd1b.py"}
    return json.loads(json.dumps(record))  # as it reads back: a resume compares it with a saved one


def start_checkpointing(accelerator, resume_state, gradient_accumulation_steps, dataloader):
    """Save and load LoRA-only state; when resuming, restore it and skip the data already seen.
    Returns the step to start from and the dataloader to continue with."""
    accelerator.register_save_state_pre_hook(functools.partial(save_lora_hook, accelerator))
    accelerator.register_load_state_pre_hook(functools.partial(load_lora_hook, accelerator))
    if not resume_state:
        return 0, dataloader
    try:  # accelerate reads state with torch.load(weights_only=True): tensors and plain values, never code
        accelerator.load_state(str(resume_state))
    except pickle.UnpicklingError as e:
        raise UserError(f"{resume_state} holds more than tensors and plain values, so it was not loaded "
                        f"({str(e).splitlines()[0][:120]}); it was not written by this trainer: delete it, or "
                        "resume from another state") from None
    start_step = read_trainer_state(resume_state)["step"]
    accelerator.print(f"resumed from {resume_state} at step {start_step}")
    # sample k is a pure function of (seed, k), so skipping the batches already seen restores the data position
    return start_step, accelerator.skip_first_batches(dataloader, start_step * gradient_accumulation_steps)


def save_checkpoint(accelerator, trained, args, settings, step):
    """Adapters (main process) and resumable state (all processes) of this step. Non-finite weights are never
    written, and a failed write (a full disk, say) leaves every earlier checkpoint as it was."""
    output_dir = settings.output_dir
    unwrapped = [unwrap(accelerator, m) for m in trained]
    if not all(torch.isfinite(p).all() for m in unwrapped for p in m.parameters() if p.requires_grad):
        raise UserError(f"the LoRA weights hold nan or inf at step {step}, so they were not saved; "
                        f"{last_good_adapters(output_dir)}. Likely fp16 overflow: use --mixed_precision bf16, "
                        "or a lower --learning_rate")
    if accelerator.num_processes > 1:  # DDP keeps replicas equal; prove it before writing one of them
        checksum = torch.stack([p.detach().double().sum() for m in unwrapped for p in m.parameters()
                                if p.requires_grad]).sum().reshape(1).to(accelerator.device)
        checksums = accelerator.gather(checksum)
        if not torch.all(checksums == checksums[0]):
            raise RuntimeError(f"the processes hold different adapters at step {step}: {checksums.tolist()}")
        accelerator.print(f"adapters identical on all {accelerator.num_processes} processes "
                          f"(checksum {checksums[0].item():.6f})")
    record = run_settings(args, settings, step, accelerator.num_processes)
    try:
        if accelerator.is_main_process:
            step_dir = save_adapters(Path(output_dir) / f"step{step - 1}", unwrapped, record,
                                     kohya=settings.output_kohya_format)
            tqdm.write(f"saved adapters to {step_dir}")
        save_resumable_state(accelerator, output_dir, step, record)
    except Exception as e:  # OSError, and safetensors' own error for a full disk
        if accelerator.is_main_process:
            remove_partial_dirs(output_dir)  # frees the space a full disk needs back
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise UserError(f"could not save step {step} in {output_dir}: {reason}; earlier checkpoints "
                        "are intact. Free some space (or fix the folder), then resume with "
                        "--resume_from_checkpoint latest") from None
    if accelerator.is_main_process and args.checkpoints_total_limit:
        prune_states(output_dir, args.checkpoints_total_limit)
