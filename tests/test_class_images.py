"""Class images: made by the base model, only the missing ones, kept for the next run."""

import numpy as np
import pytest
import torch
from PIL import Image

import train_dreambooth_lora_ssd1b as trainer
from dreambooth_kit import imaging, pipeline


@pytest.fixture(scope="module")
def pipe(tiny_model):
    models = pipeline.load_models(tiny_model, tiny_model / "vae", None, None, torch.float32, "cpu")
    return pipeline.build_pipeline(models, str(tiny_model), None, None)


def make(pipe, class_dir, count, batch_size=2):
    """What each run does: find the missing names, make them, use the first `count` images."""
    class_dir.mkdir(parents=True, exist_ok=True)
    names = trainer.missing_class_images(class_dir, count)
    trainer.generate_class_images(pipe, class_dir, "a photo of dog", names, batch_size, 64, seed=0,
                                  num_inference_steps=2, disable_progress=True)
    return imaging.list_images(class_dir)[:count]


def test_only_missing_class_images_are_made(pipe, tmp_path, monkeypatch):
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    Image.new("RGB", (64, 64), "red").save(class_dir / "my_own_dog.jpg")  # the user's own class photo counts
    Image.new("RGB", (64, 64), "blue").save(class_dir / "class_00001.png")
    before = {p.name: p.read_bytes() for p in class_dir.iterdir()}

    calls = []
    real = pipeline.generate_images
    monkeypatch.setattr(trainer, "generate_images", lambda p, prompt, seeds, *a, **k: calls.append(seeds)
                        or real(p, prompt, seeds, *a, **k))
    images = make(pipe, class_dir, 5)

    assert sorted(p.name for p in images) == ["class_00000.png", "class_00001.png", "class_00002.png",
                                              "class_00003.png", "my_own_dog.jpg"]
    assert [len(s) for s in calls] == [2, 1], "3 missing images in batches of --sample_batch_size 2"
    assert all(before[name] == (class_dir / name).read_bytes() for name in before), "existing files untouched"
    assert all(Image.open(p).size == (64, 64) for p in images)

    calls.clear()
    assert len(make(pipe, class_dir, 5)) == 5
    assert calls == [], "a second run finds them all and makes none"


def test_class_image_depends_only_on_seed_and_index(pipe, tmp_path):
    make(pipe, tmp_path / "a", 3, batch_size=3)
    make(pipe, tmp_path / "b", 3, batch_size=1)
    for name in ["class_00000.png", "class_00001.png", "class_00002.png"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes() or \
            torch.allclose(torch.tensor(np.asarray(Image.open(tmp_path / "a" / name)), dtype=torch.float),
                           torch.tensor(np.asarray(Image.open(tmp_path / "b" / name)), dtype=torch.float), atol=2)
    assert (tmp_path / "a" / "class_00000.png").read_bytes() != (tmp_path / "a" / "class_00001.png").read_bytes()
