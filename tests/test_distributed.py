"""Scale-out through accelerate, tested on two CPU processes with gloo: the same script, unchanged."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import train_dreambooth_lora_ssd1b as trainer
from dreambooth_kit import artifacts, pipeline
from conftest import ROOT, tiny_args

CONFIGS = ROOT / "examples" / "accelerate"


def torchrun(flags):
    # --standalone: a free port for the rendezvous, not 29500, which another test worker (-n 2) may hold
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "train_dreambooth_lora_ssd1b.py"), *map(str, flags)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def two_process_run(tiny_model, photos, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("ddp") / "out"
    flags = tiny_args(tiny_model, photos, output_dir, "--max_train_steps", 4, "--checkpointing_steps", 2,
                      "--with_prior_preservation", "--class_prompt", "a photo of dog", "--num_class_images", 5,
                      "--train_text_encoder", "--optimizer", "prodigy", "--learning_rate", 1.0,
                      "--validation_prompt", "a photo of sks dog", "--num_validation_images", 1,
                      "--validation_inference_steps", 2)
    return output_dir, flags, torchrun(flags)


def test_two_processes_train_with_prior_preservation_and_prodigy(two_process_run):
    output_dir, _, result = two_process_run
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "DistributedType.MULTI_CPU" in log and "Num processes: 2" in log
    assert "effective batch 2 = 1 per device x 2 processes x 1 accumulation" in log
    assert log.count("saved adapters to") == 2, "only the main process writes adapters"
    assert sorted(p.name for p in output_dir.glob("*step*")) == ["state-step1", "state-step3", "step1", "step3"]
    assert {p.name for p in (output_dir / "state-step3").glob("random_states_*")} == {"random_states_0.pkl",
                                                                                      "random_states_1.pkl"}
    weights = load_file(output_dir / "step3" / "unet" / "adapter_model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert log.count("adapters identical on all 2 processes") == 2, "all-gathered checksums agree at every save"
    assert len(list((output_dir / "validation" / "step3").glob("seed*.png"))) == 1


def test_class_images_are_split_exactly_and_named_by_index(two_process_run, tiny_model):
    output_dir, _, result = two_process_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (output_dir / "class_images").iterdir()) == [
        f"class_{i:05d}.png" for i in range(5)], "exactly N files, none twice, no temporary leftovers"
    # the name fixes the seed, so one process makes the same image that two processes made
    models = pipeline.load_models(tiny_model, tiny_model / "vae", None, None, torch.float32, "cpu")
    pipe = pipeline.build_pipeline(models, str(tiny_model), None, None)
    (output_dir.parent / "single").mkdir()
    trainer.generate_class_images(pipe, output_dir.parent / "single", "a photo of dog", ["class_00003.png"], 4, 64,
                                  0, disable_progress=True)
    ours = np.asarray(Image.open(output_dir.parent / "single" / "class_00003.png"), dtype=int)
    theirs = np.asarray(Image.open(output_dir / "class_images" / "class_00003.png"), dtype=int)
    assert np.abs(ours - theirs).max() <= 2


def test_two_process_run_resumes(two_process_run):
    output_dir, flags, result = two_process_run
    assert result.returncode == 0, result.stderr[-3000:]
    flags = list(flags)
    flags[flags.index("--max_train_steps") + 1] = 6
    flags += ["--resume_from_checkpoint", "latest"]
    resumed = torchrun(flags)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {output_dir / 'state-step3'} at step 4" in resumed.stdout + resumed.stderr
    assert (output_dir / "step5" / artifacts.LORA_FILE).is_file()


@pytest.mark.parametrize("scale_lr", [True, False])
def test_scale_lr_multiplies_only_when_asked_and_records_flag_and_rate(tiny_model, photos, tmp_path, capsys,
                                                                       monkeypatch, scale_lr):
    from conftest import run_trainer

    optimizers, real = [], trainer.make_optimizer
    monkeypatch.setattr(trainer, "make_optimizer", lambda *a: optimizers.append(real(*a)) or optimizers[-1])
    run_trainer(*tiny_args(tiny_model, photos, tmp_path / "a", "--max_train_steps", 1, "--optimizer", "adamw",
                           "--train_batch_size", 2, "--gradient_accumulation_steps", 3, "--train_text_encoder",
                           *(["--scale_lr"] if scale_lr else [])))
    factor = 6 if scale_lr else 1
    out = capsys.readouterr().out
    assert ("--scale_lr: learning rates x 6 -> 0.0006 (UNet), 3e-05 (text encoders)" in out) == scale_lr
    assert [g["initial_lr"] for g in optimizers[0].param_groups] == pytest.approx([1e-4 * factor] + [5e-6 * factor] * 2)
    settings = json.loads((tmp_path / "a" / "step0" / "run_settings.json").read_text())
    assert (settings["learning_rate"], settings["text_encoder_lr"]) == (1e-4, 5e-6), "the flags as typed"
    derived = settings["derived"]
    assert (derived["effective_learning_rate"], derived["effective_text_encoder_lr"]) == pytest.approx(
        (1e-4 * factor, 5e-6 * factor)), "and the rates that trained"


@pytest.mark.parametrize("name, distributed_type, processes", [
    ("single_gpu_fp16.yaml", "NO", 1), ("multi_gpu.yaml", "MULTI_GPU", 4),
    ("multi_node.yaml", "MULTI_GPU", 16), ("deepspeed_zero2.yaml", "DEEPSPEED", 2)])
def test_example_accelerate_configs_load(name, distributed_type, processes):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / name))
    assert (str(config.distributed_type).split(".")[-1], config.num_processes) == (distributed_type, processes)


def test_two_processes_with_buckets_masks_dropout_base_prediction_and_dora_train_as_one_accumulating(
        tiny_model, photos, tmp_path):
    # sample k's photo, bucket, mask, caption dropout, noise and timestep come from (seed, k), and the class half's
    # target from the base model (DoRA switched off too): 2 processes x 1 sample train as 1 process accumulating 2
    from conftest import run_trainer

    from test_options import with_half_masks

    folder = with_half_masks(photos, tmp_path / "dog")
    flags = ["--max_train_steps", 2, "--masked_loss", "--caption_dropout", 0.5, "--with_prior_preservation",
             "--class_prompt", "a photo of dog", "--prior_target", "base_prediction", "--random_flip",
             "--cache_latents", "off",
             # Adam with a large epsilon and no clipping: updates in proportion to the gradients, as SGD's, so
             # gloo's own order of summation cannot be blown up by Adam's normalisation of a near-zero gradient
             "--optimizer", "adamw", "--learning_rate", 1.0, "--adam_epsilon", 1.0, "--adam_weight_decay", 0,
             "--max_grad_norm", 1e6,
             "--aspect_ratio_buckets", "64,64;64,96;96,64", "--use_dora"]
    result = torchrun(tiny_args(tiny_model, folder, tmp_path / "ddp", *flags))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "adapters identical on all 2 processes" in result.stdout + result.stderr
    assert not (tmp_path / "ddp" / "class_images").exists()
    run_trainer(*tiny_args(tiny_model, folder, tmp_path / "single", *flags, "--gradient_accumulation_steps", 2))
    ddp = load_file(tmp_path / "ddp" / "step1" / artifacts.LORA_FILE)
    single = load_file(tmp_path / "single" / "step1" / artifacts.LORA_FILE)
    assert ddp.keys() == single.keys() and any("magnitude" in k for k in ddp), "DoRA's magnitudes, as trained"
    assert max(v.abs().max().item() for k, v in ddp.items() if "lora_B" in k or "lora.up" in k) > 1e-4, "it learned"
    for key in ddp:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("base", ["--fp8_base", "--nf4_base"])
def test_two_processes_train_over_a_quantised_base(tiny_model, photos, tmp_path, base):
    # gloo cannot broadcast float8, and DistributedDataParallel starts by broadcasting every parameter: the frozen
    # ones, the same in every process, are left out of it
    result = torchrun(tiny_args(tiny_model, photos, tmp_path / "out", base, "--mixed_precision", "bf16",
                                "--max_train_steps", 2, "--optimizer", "adamw", "--train_text_encoder"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "adapters identical on all 2 processes" in result.stdout + result.stderr
