"""Whole runs on the tiny model: through `accelerate launch`, and in-process to pin what single flags do."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train_dreambooth_lora_ssd1b as trainer
from dreambooth_kit import artifacts, imaging
from conftest import ROOT, check_inputs, run_trainer, tiny_args


def test_accelerate_launch_trains_validates_saves_and_infers(tiny_model, photos, tmp_path):
    output_dir = tmp_path / "out"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "train_dreambooth_lora_ssd1b.py")]
    flags = tiny_args(tiny_model, photos, output_dir, "--with_prior_preservation", "--class_prompt",
                      "a photo of dog", "--num_class_images", 4, "--max_train_steps", 4, "--checkpointing_steps", 2,
                      "--validation_prompt", "a photo of sks dog in a bucket", "--num_validation_images", 2,
                      "--validation_steps", 2, "--validation_inference_steps", 2, "--dataloader_num_workers", 2,
                      "--report_to", "tensorboard", "--optimizer", "adamw8bit")
    result = subprocess.run([*launch, *map(str, flags)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Num processes: 1" in result.stdout + result.stderr, "accelerate's state is logged at start"
    assert "ms/step" in result.stdout and "peak RSS" in result.stdout, "the run reports its speed and memory"

    assert sorted(p.name for p in output_dir.glob("step*")) == ["step1", "step3"]
    assert len(list((output_dir / "class_images").glob("*.png"))) == 4
    assert sorted(p.name for p in (output_dir / "validation" / "step3").iterdir()) == ["grid.png", "seed0.png", "seed1.png"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = [EventAccumulator(str(f.parent)).Reload() for f in (output_dir / "logs").rglob("events.out.tfevents.*")]
    tags = {tag for log in logs for kind in ("images", "scalars") for tag in log.Tags()[kind]}
    assert {"validation_grid", "loss", "lr"} <= tags, "every round's grid and the loss reach tensorboard"

    render = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--checkpoint", str(output_dir / "step3"),
                             "--num_inference_steps", "2", "--output", str(tmp_path / "renders")],
                            capture_output=True, text=True, timeout=300)
    assert render.returncode == 0, render.stderr[-3000:]
    assert (tmp_path / "renders" / "step3_seed0.png").is_file()


def adapter(output_dir, step="step1", part="unet"):
    return load_file(output_dir / step / part / "adapter_model.safetensors")


def run(tiny_model, photos, output_dir, *extra):
    run_trainer(*tiny_args(tiny_model, photos, output_dir, "--max_train_steps", 2, "--optimizer", "adamw", *extra))
    return adapter(output_dir)


def test_same_seed_same_adapters_other_seed_other_adapters(tiny_model, photos, tmp_path):
    first = run(tiny_model, photos, tmp_path / "a", "--random_flip")
    again = run(tiny_model, photos, tmp_path / "b", "--random_flip")
    other = run(tiny_model, photos, tmp_path / "c", "--random_flip", "--seed", 1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_gradient_accumulation_and_batch_size_draw_that_many_samples(tiny_model, photos, tmp_path, monkeypatch):
    drawn = []
    real = trainer.DreamBoothDataset.__getitem__
    monkeypatch.setattr(trainer.DreamBoothDataset, "__getitem__", lambda self, k: drawn.append(k) or real(self, k))
    run(tiny_model, photos, tmp_path / "out", "--gradient_accumulation_steps", 3, "--train_batch_size", 2)
    assert sorted(drawn) == list(range(2 * 3 * 2)), "2 steps x 3 micro-batches x 2 samples, each drawn once"


def test_bf16_mixed_precision_keeps_lora_weights_fp32(tiny_model, photos, tmp_path, monkeypatch):
    seen = {}
    real = trainer.make_optimizer
    monkeypatch.setattr(trainer, "make_optimizer", lambda trained, *rest: seen.update(trained=trained)
                        or real(trained, *rest))
    weights = run(tiny_model, photos, tmp_path / "out", "--mixed_precision", "bf16", "--train_text_encoder")
    unet = seen["trained"][0]
    trainable = [p for p in unet.parameters() if p.requires_grad]
    frozen = [p for p in unet.parameters() if not p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_lr_scheduler_and_warmup_shape_the_logged_learning_rate(tiny_model, photos, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_trainer(*tiny_args(tiny_model, photos, tmp_path / "out", "--max_train_steps", 4, "--optimizer", "adamw",
                           "--lr_scheduler", "linear", "--lr_warmup_steps", 2, "--learning_rate", 1e-3,
                           "--report_to", "tensorboard"))
    events = EventAccumulator(str(next((tmp_path / "out" / "logs").rglob("events.out.tfevents.*")).parent))
    lrs = [e.value for e in events.Reload().Scalars("lr")]
    assert lrs == pytest.approx([1e-3 * 1 / 2, 1e-3, 1e-3 * 2 / 2 * 1 / 2, 0.0], abs=1e-9)


def test_training_the_text_encoders_saves_their_adapters(trained_run):
    for part in ["text_encoder_one", "text_encoder_two"]:
        weights = adapter(trained_run, "step3", part)
        assert weights and any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k)
    diffusers_file = load_file(trained_run / "step3" / artifacts.LORA_FILE)
    prefixes = {k.split(".")[0] for k in diffusers_file}
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}


def test_unet_only_run_saves_no_text_encoder_adapters(tiny_model, photos, tmp_path):
    run(tiny_model, photos, tmp_path / "out")
    assert not (tmp_path / "out" / "step1" / "text_encoder_one").exists()
    assert {k.split(".")[0] for k in load_file(tmp_path / "out" / "step1" / artifacts.LORA_FILE)} == {"unet"}


def test_accelerate_config_precision_is_honoured_without_the_flag(tiny_model, photos, tmp_path, monkeypatch):
    seen = {}
    real = trainer.make_optimizer
    monkeypatch.setattr(trainer, "make_optimizer", lambda trained, *rest: seen.update(trained=trained)
                        or real(trained, *rest))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate config` / launch pass on
    run(tiny_model, photos, tmp_path / "out")
    assert {p.dtype for p in seen["trained"][0].parameters() if not p.requires_grad} == {torch.bfloat16}


def test_hub_dataset_id_is_fetched_as_the_instance_folder(tiny_model, photos, tmp_path, monkeypatch):
    import huggingface_hub

    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, repo_type=None, revision=None, **kwargs: asked.append((repo, repo_type)) or str(photos))
    argv = tiny_args(tiny_model, photos, tmp_path / "out", "--instance_dir", "diffusers/dog-example")
    assert check_inputs(argv)[0] == imaging.list_images(photos)
    assert asked == [("diffusers/dog-example", "dataset")]


def test_every_training_step_runs_in_train_mode_so_lora_dropout_acts(tiny_model, photos, tmp_path, monkeypatch):
    # from_pretrained leaves models in eval mode; without train(), --lora_dropout would act only after a validation
    modes, real = [], trainer.training_step
    monkeypatch.setattr(trainer, "training_step", lambda batch, models, *a, **k: modes.append(
        (models.unet.training, [m.training for m in models.text_encoders])) or real(batch, models, *a, **k))
    run_trainer(*tiny_args(tiny_model, photos, tmp_path / "out", "--max_train_steps", 3, "--optimizer", "adamw",
                           "--lora_dropout", 0.1, "--train_text_encoder", "--validation_prompt", "a sks dog",
                           "--validation_steps", 2, "--validation_inference_steps", 1, "--num_validation_images", 1))
    assert modes == [(True, [True, True])] * 3
