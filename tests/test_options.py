"""Beyond diffusers' script: masked loss, caption dropout, and prior preservation from the base model's prediction."""


import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import train_dreambooth_lora_ssd1b as trainer
from dreambooth_kit import artifacts, imaging, messages, pipeline
from conftest import run_trainer, tiny_args


@pytest.fixture(scope="module")
def models(tiny_model):
    return pipeline.load_models(tiny_model, tiny_model / "vae", None, None, torch.float32, "cpu")


def gradient_photo(path, size=(96, 64)):
    """A photo whose red channel is its x position and green its y: any crop or flip shows in its pixels."""
    xs, ys = np.meshgrid(np.linspace(0, 255, size[0]), np.linspace(0, 255, size[1]))
    Image.fromarray(np.stack([xs, ys, np.full_like(xs, 90)], -1).astype(np.uint8)).save(path)
    return path


def masked_photos(folder, n=3, size=(96, 64)):
    """n photos, each with a mask that is its own red channel: after the same resize, flip and crop, the mask
    must equal the photo's red channel exactly."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = [gradient_photo(folder / f"p{i}.png", size) for i in range(n)]
    for photo in photos:
        Image.open(photo).getchannel("R").save(imaging.mask_path(photo))
    return photos


# ----------------------------------------------------------------------------------------------------------
# Masked loss
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("center_crop", [False, True])
def test_a_mask_goes_through_exactly_its_photos_resize_flip_and_crop(tmp_path, center_crop):
    photos = masked_photos(tmp_path / "photos")
    data = trainer.DreamBoothDataset(photos, "a photo of sks dog", resolution=32, center_crop=center_crop,
                                     random_flip=True, seed=0, num_samples=24, masked=True)
    flips = set()
    for k in range(24):
        item = data[k]
        red = (item["pixel_values"][0] + 1) * 127.5
        assert item["mask"].shape == (1, 32, 32)
        torch.testing.assert_close(item["mask"][0] * 255, red, rtol=0, atol=1e-3)
        flips.add(bool(red[0, 0] > red[0, -1]))
    assert flips == {False, True}, "both flips were drawn, and each mask followed its photo"


def test_a_photo_without_a_mask_weighs_one_everywhere(tmp_path):
    photos = masked_photos(tmp_path / "photos", n=1) + [gradient_photo(tmp_path / "photos" / "plain.png")]
    data = trainer.DreamBoothDataset(photos, "a photo of sks dog", resolution=32, center_crop=True,
                                     random_flip=False, seed=0, num_samples=2, masked=True)
    masks = {data.instances.index(trainer.pick(data.instances, k, 0, "instance")): data[k]["mask"] for k in range(2)}
    assert torch.all(masks[1] == 1) and not torch.all(masks[0] == 1)


def test_mask_weights_are_the_floor_on_black_and_one_on_white_and_the_class_half_weighs_one():
    masks = torch.zeros(2, 1, 16, 16)
    masks[:, :, :, 8:] = 1  # right half white
    weights = trainer.loss_weights(masks, (2, 2), 0.25, 4)
    assert weights.shape == (4, 1, 2, 2)
    assert torch.all(weights[:2, :, :, 0] == 0.25) and torch.all(weights[:2, :, :, 1] == 1)
    assert torch.all(weights[2:] == 1), "the class half"


def test_with_floor_zero_the_pixels_under_black_change_neither_loss_nor_gradients(models, tiny_model, tmp_path):
    # an encoder and a denoiser that each see one place only (the real ones' attention spreads every pixel over all
    # latents): what reaches the loss from under the mask's black part is then its weight alone, 0 at floor 0
    folder = tmp_path / "photos"
    folder.mkdir()
    photo = gradient_photo(folder / "dog.png", (64, 64))
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255
    Image.fromarray(mask).save(imaging.mask_path(photo))
    args = trainer.parse_args([str(a) for a in tiny_args(tiny_model, folder, tmp_path / "out", "--masked_loss",
                                                         "--random_flip")])
    local = trainer.dataclasses.replace(models, vae=LocalVAE(models.vae), unet=PointwiseUNet())

    def loss_and_grads(image):
        image.save(photo)
        data = trainer.DreamBoothDataset([photo], "a photo of sks dog", resolution=64, center_crop=False,
                                         random_flip=True, seed=0, num_samples=4, masked=True)
        batch = trainer.collate([data[k] for k in range(4)])
        local.unet.zero_grad()
        loss = trainer.training_step(batch, local, trainer.sample_generators(0, batch, "cpu"), "cpu",
                                     **trainer.method_settings(args))
        loss.backward()
        return loss.item(), [p.grad.clone() for p in local.unet.parameters()]

    original = np.asarray(Image.open(photo).convert("RGB"))
    under_black, under_white = original.copy(), original.copy()
    under_black[:, 32:] = 255 - under_black[:, 32:]
    under_white[:, :32] = 255 - under_white[:, :32]
    loss, grads = loss_and_grads(Image.fromarray(original))
    black_loss, black_grads = loss_and_grads(Image.fromarray(under_black))
    assert loss == black_loss and all(torch.equal(a, b) for a, b in zip(grads, black_grads))
    assert all(g.abs().sum() > 0 for g in grads)
    assert loss_and_grads(Image.fromarray(under_white))[0] != loss, "the white part is what the loss sees"


class LocalVAE(torch.nn.Module):
    """A stand-in encoder: each latent is its own 8x8 pixel block's mean (and the red mean twice)."""

    def __init__(self, vae):
        super().__init__()
        self.config, self.dtype = vae.config, torch.float32

    def encode(self, pixels):
        mean = torch.nn.functional.avg_pool2d(pixels, 8)
        mean = torch.cat([mean, mean[:, :1]], dim=1)
        moments = torch.cat([mean, torch.full_like(mean, -30.0)], dim=1)  # log-variance: next to no noise
        return type("Out", (), {"latent_dist": type("D", (), {"parameters": moments})})


class PointwiseUNet(torch.nn.Module):
    """A stand-in denoiser with trainable weights, each latent pixel predicted from itself alone."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(4, 4, 1)

    def forward(self, noisy, timesteps, embeds, added_cond_kwargs):
        return type("Out", (), {"sample": self.conv(noisy)})


def test_the_latent_cache_keeps_each_flips_mask_as_an_uncached_step_sees_it(models, tmp_path):
    photos = masked_photos(tmp_path / "photos", n=2, size=(64, 64))
    cache = trainer.encode_latent_cache(models.vae, trainer.latent_targets(photos, [], 64), True, True, 0, "cpu",
                                        masked=True)
    data = trainer.DreamBoothDataset(photos, "a photo of sks dog", resolution=64, center_crop=True,
                                     random_flip=True, seed=0, num_samples=8, masked=True)
    cached = trainer.DreamBoothDataset(photos, "a photo of sks dog", resolution=64, center_crop=True,
                                       random_flip=True, seed=0, num_samples=8, masked=True, cached=True)
    for k in range(8):
        mask = cache[cached[k]["latent_key"]][2]
        expected = torch.nn.functional.interpolate(data[k]["mask"][None], size=(8, 8), mode="area")[0]
        torch.testing.assert_close(mask, expected)


@pytest.mark.parametrize("setup, message", [
    ("mask only", "dog_0.mask.png in {folder} is a loss mask (1 in all): pass --masked_loss to use them"),
    ("no masks", "--masked_loss found no masks: add photo.mask.png"),
    ("orphan", "1 mask in {folder} cannot be used: cat.mask.png (no photo named cat.*)"),
    ("wrong size", "dog_0.mask.png (32x32, its photo dog_0.jpg is"),
    ("upper case", "dog_0.MASK.png (not named in lower case)"),
    ("unreadable", "dog_0.mask.png (unreadable: "),
    ("transparent", "dog_0.mask.png (has transparency: save it as grey scale without alpha)"),
    ("all black", "dog_0.mask.png (all black: at --mask_floor 0 its photo would train nothing)"),
    ("a folder", "1 mask in {folder} cannot be used: dog_0.mask.png (not a file)"),
    ("a broken link", "1 mask in {folder} cannot be used: dog_0.mask.png (a broken symlink)"),
])
def test_masks_are_checked_before_any_model_loads(tiny_model, photos, tmp_path, capsys, setup, message):
    import shutil

    folder = tmp_path / "dog"
    shutil.copytree(photos, folder)
    name = {"upper case": "dog_0.MASK.png", "orphan": "cat.mask.png"}.get(setup, "dog_0.mask.png")
    size = (32, 32) if setup == "wrong size" else Image.open(folder / "dog_0.jpg").size
    if setup == "unreadable":
        (folder / name).write_bytes(b"not a png")
    elif setup == "a folder":
        (folder / name).mkdir()
    elif setup == "a broken link":
        (folder / name).symlink_to(folder / "gone.png")
    elif setup in ("transparent", "all black"):
        Image.new("LA" if setup == "transparent" else "L", size, 0).save(folder / name)
    elif setup != "no masks":
        Image.new("L", size, 255).save(folder / name)
    flags = [] if setup == "mask only" else ["--masked_loss"]
    with pytest.raises(messages.UserError, match=__import__("re").escape(message.format(folder=folder))):
        run_trainer(*tiny_args(tiny_model, folder, tmp_path / "out", *flags))
    assert "warning" not in capsys.readouterr().err, "the refusal is all that is said"


def test_a_16_bit_mask_is_scaled_not_clipped(tmp_path):
    photo = gradient_photo(tmp_path / "dog.png", (32, 32))
    Image.fromarray(np.full((32, 32), 32768, np.uint16)).save(imaging.mask_path(photo))  # half of 65535
    mask = trainer.load_mask(photo, (32, 32))
    assert set(np.asarray(mask).ravel().tolist()) == {128}


# ----------------------------------------------------------------------------------------------------------
# Caption dropout
# ----------------------------------------------------------------------------------------------------------


def test_caption_dropout_is_drawn_per_sample_from_the_seed(tmp_path):
    photo = gradient_photo(tmp_path / "a.png")

    def prompts(seed, rate):
        data = trainer.DreamBoothDataset([photo], "a photo of sks dog", resolution=32, center_crop=True,
                                         random_flip=False, seed=seed, num_samples=400, caption_dropout=rate)
        return [data[k]["prompt"] for k in range(400)]

    dropped = prompts(0, 0.25)
    assert set(dropped) == {"", "a photo of sks dog"}
    assert 0.18 < dropped.count("") / 400 < 0.32
    assert prompts(0, 0.25) == dropped, "the same seed drops the same samples"
    assert prompts(1, 0.25) != dropped
    assert "" not in prompts(0, 0.0)
    without = trainer.DreamBoothDataset([photo], "a photo of sks dog", resolution=32, center_crop=False,
                                        random_flip=True, seed=0, num_samples=8)
    with_dropout = trainer.DreamBoothDataset([photo], "a photo of sks dog", resolution=32, center_crop=False,
                                             random_flip=True, seed=0, num_samples=8, caption_dropout=0.5)
    for k in range(8):
        assert torch.equal(without[k]["pixel_values"], with_dropout[k]["pixel_values"]), "crops are unchanged"


@pytest.mark.parametrize("cached", [False, True])
def test_a_dropped_caption_trains_the_pipelines_unconditional(models, tiny_model, cached):
    # SDXL's pipeline renders classifier-free guidance's other half from zeros (force_zeros_for_empty_prompt)
    prompts = ["a photo of sks dog", ""]
    models.prompt_cache = trainer.encode_prompt_cache(models, prompts, "cpu") if cached else None
    try:
        embeds, pooled = trainer.prompt_embeddings(prompts, models, False, "cpu")
    finally:
        models.prompt_cache = None
    assert models.empty_prompt_is_zeros
    assert torch.all(embeds[1] == 0) and torch.all(pooled[1] == 0)
    assert embeds[0].abs().sum() > 0 and pooled[0].abs().sum() > 0
    pipe = pipeline.build_pipeline(models, str(tiny_model), None, None)
    _, negative, _, negative_pooled = pipe.encode_prompt("a photo of sks dog", device="cpu",
                                                         do_classifier_free_guidance=True)
    assert torch.equal(negative[0], embeds[1]) and torch.equal(negative_pooled[0], pooled[1])


# ----------------------------------------------------------------------------------------------------------
# Prior preservation from the base model's prediction
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_base_prediction_prior_is_exactly_zero_while_lora_is_still_zero(tiny_model, photos, tmp_path,
                                                                        train_text_encoder):
    models = pipeline.load_models(tiny_model, tiny_model / "vae", None, None, torch.float32, "cpu")
    trainer.add_lora(models, 4, 4, 0.0, train_text_encoder)
    extra = ["--train_text_encoder"] if train_text_encoder else []
    args = trainer.parse_args([str(a) for a in tiny_args(
        tiny_model, photos, tmp_path / "out", *extra, "--with_prior_preservation", "--class_prompt", "a photo of dog",
        "--prior_target", "base_prediction")])
    data = trainer.DreamBoothDataset(imaging.list_images(photos), "a photo of sks dog", class_prompt="a photo of dog",
                                     resolution=64, center_crop=True, random_flip=False, seed=0, num_samples=2)
    batch = trainer.collate([data[0], data[1]])
    assert batch["prompts"] == ["a photo of sks dog"] * 2 + ["a photo of dog"] * 2 and len(batch["pixel_values"]) == 2
    seen = {}
    real = trainer.dreambooth_loss
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "dreambooth_loss", lambda pred, target, *a, **k: seen.update(
            pred=pred, target=target, kwargs=k) or real(pred, target, *a, **k))
        loss = trainer.training_step(batch, models, trainer.sample_generators(0, batch, "cpu"), "cpu",
                                     **trainer.method_settings(args))
    instance, prior = (seen["pred"] - seen["target"]).pow(2).mean(dim=(1, 2, 3)).chunk(2)
    # LoRA's B starts at zero: the trained model is the base model. Zero up to rounding only: the base model runs
    # on the class half alone, and a batch of another size takes other kernel paths (a few 1e-7 apart)
    assert torch.all(prior < 1e-12) and torch.all(instance > 0.1), (prior, instance)
    assert torch.all(instance > 0) and loss.item() == pytest.approx(instance.mean().item())
    loss.backward()
    lora = [p for n, p in models.unet.named_parameters() if "lora_" in n]
    assert all(p.requires_grad for p in lora), "the adapters are on again after the base prediction"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)


def test_base_prediction_makes_and_reads_no_class_image(tiny_model, photos, tmp_path, monkeypatch, capsys):
    def refuse(*a, **k):
        raise AssertionError("no class image is made or read")

    monkeypatch.setattr(trainer, "prepare_class_images", refuse)
    monkeypatch.setattr(trainer, "generate_class_images", refuse)
    out = tmp_path / "out"
    run_trainer(*tiny_args(tiny_model, photos, out, "--with_prior_preservation", "--class_prompt", "a photo of dog",
                           "--prior_target", "base_prediction", "--max_train_steps", 2, "--optimizer", "adamw"))
    assert not (out / "class_images").exists()
    assert "5 instance photos, 0 class images" in capsys.readouterr().out
    assert (out / "step1" / artifacts.LORA_FILE).is_file()
    assert "the base model's own prediction" in (out / "README.md").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--prior_target", "base_prediction"], "--prior_target acts only with --with_prior_preservation"),
    (["--with_prior_preservation", "--class_prompt", "a photo of dog", "--prior_target", "base_prediction",
      "--num_class_images", "10"], "--num_class_images has no effect with --prior_target base_prediction, which makes "
                                   "and reads no class image: drop --num_class_images, or pass --prior_target "
                                   "class_images"),
    (["--with_prior_preservation", "--class_prompt", "a photo of dog", "--prior_target", "base_prediction",
      "--class_dir", "x"], "--class_dir has no effect with --prior_target base_prediction"),
    (["--prior_target", "images"], "argument --prior_target: invalid choice: 'images'"),
    (["--mask_floor", "0.1"], "--mask_floor acts only with --masked_loss: add --masked_loss, or drop --mask_floor"),
    (["--masked_loss", "--mask_floor", "1"], "--mask_floor must be in [0, 1) (got 1.0)"),
    (["--with_prior_preservation", "--class_prompt", "a photo of dog", "--prior_loss_weight", "0"],
     "--prior_loss_weight must be above 0 (got 0.0)"),
    (["--caption_dropout", "1"], "--caption_dropout must be in [0, 1) (got 1.0)"),
    (["--caption_dropout", "-0.1"], "--caption_dropout must be in [0, 1) (got -0.1)"),
])
def test_option_mistakes_are_one_line_before_any_model_loads(tiny_model, photos, tmp_path, extra, message):
    with pytest.raises(messages.UserError, match=__import__("re").escape(message)):
        trainer.parse_args([str(a) for a in tiny_args(tiny_model, photos, tmp_path / "out", *extra)])


def test_base_prediction_is_the_base_models_own_once_the_adapters_have_trained(tiny_model, photos, tmp_path):
    # with LoRA's B no longer zero, the class half's target must be the model with its adapters off: the same as
    # the model with every lora_B zeroed. (Whether this holds the class prompt's renders nearer the base model's
    # is held by tests/test_world.py on the pre-trained tiny world, with benchmarks/prior_drift.py's numbers in the
    # README.)
    models = pipeline.load_models(tiny_model, tiny_model / "vae", None, None, torch.float32, "cpu")
    trainer.add_lora(models, 4, 4, 0.0, True)
    torch.manual_seed(0)
    for name, p in [*models.unet.named_parameters(), *(np for te in models.text_encoders
                                                        for np in te.named_parameters())]:
        if "lora_B" in name:
            p.data.normal_(std=0.1)  # as training leaves them
    args = trainer.parse_args([str(a) for a in tiny_args(
        tiny_model, photos, tmp_path / "out", "--train_text_encoder", "--with_prior_preservation", "--class_prompt",
        "a photo of dog", "--prior_target", "base_prediction")])
    data = trainer.DreamBoothDataset(imaging.list_images(photos), "a photo of sks dog", class_prompt="a photo of dog",
                                     resolution=64, center_crop=True, random_flip=False, seed=0, num_samples=2)
    batch = trainer.collate([data[0], data[1]])
    seen = {}
    real = trainer.dreambooth_loss
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(trainer, "dreambooth_loss", lambda pred, target, *a, **k: seen.update(
            pred=pred, target=target) or real(pred, target, *a, **k))
        patch.setattr(trainer, "base_prediction", spy_on(trainer.base_prediction, seen))
        trainer.training_step(batch, models, trainer.sample_generators(0, batch, "cpu"), "cpu",
                              **trainer.method_settings(args))
        noisy, timesteps, time_ids = seen["inputs"]
        for name, p in [*models.unet.named_parameters(), *(np for te in models.text_encoders
                                                            for np in te.named_parameters())]:
            if "lora_B" in name:
                p.data.zero_()
        embeds, pooled = trainer.encode_prompt(models.text_encoders, models.tokenizers, ["a photo of dog"] * 2, "cpu")
        base = models.unet(noisy, timesteps, embeds, added_cond_kwargs={"text_embeds": pooled,
                                                                       "time_ids": time_ids}).sample
    torch.testing.assert_close(seen["target"][2:], base, rtol=0, atol=1e-6)
    assert (seen["pred"][2:] - seen["target"][2:]).abs().mean() > 1e-2, "the trained model differs from it"


def spy_on(function, seen):
    def spy(models, noisy_latents, timesteps, prompts, time_ids, *args):
        seen["inputs"] = (noisy_latents, timesteps, time_ids)
        return function(models, noisy_latents, timesteps, prompts, time_ids, *args)
    return spy


# ----------------------------------------------------------------------------------------------------------
# Together, and across a resume
# ----------------------------------------------------------------------------------------------------------


def test_masks_caption_dropout_and_base_prediction_resume_to_the_uninterrupted_adapters(tiny_model, photos,
                                                                                         tmp_path):
    folder = with_half_masks(photos, tmp_path / "dog")
    flags = ["--masked_loss", "--mask_floor", 0.1, "--caption_dropout", 0.3, "--with_prior_preservation",
             "--class_prompt", "a photo of dog", "--prior_target", "base_prediction", "--train_text_encoder",
             "--text_encoder_lr", 1e-3, "--learning_rate", 1e-3, "--random_flip"]
    run = straight_then_resumed(tiny_args(tiny_model, folder, tmp_path / "out", *flags), tmp_path)
    inverted = 255 - np.asarray(Image.open(folder / "dog_0.mask.png"))
    Image.fromarray(inverted).save(folder / "dog_0.mask.png")  # a mask edited under a resumable run
    with pytest.raises(messages.UserError, match="the instance photos, their captions or their masks"):
        run("resumed", 6, "--resume_from_checkpoint", "latest")


def with_half_masks(photos, folder):
    """A copy of the photos, the first three with a mask whose left half is white; the others have none (and
    weigh 1 everywhere)."""
    __import__("shutil").copytree(photos, folder)
    for photo in imaging.list_images(folder)[:3]:
        mask = np.zeros(Image.open(photo).size[::-1], np.uint8)
        mask[:, : mask.shape[1] // 2] = 255
        Image.fromarray(mask).save(imaging.mask_path(photo))
    return folder


def straight_then_resumed(argv, tmp_path):
    """Train 4 steps straight, and 2 then 2 more resumed; assert both end with the same adapters. Returns the
    runner (folder name, steps, extra flags) for more."""
    from safetensors.torch import load_file

    def run(name, steps, *extra):
        run_trainer(*argv, "--output_dir", tmp_path / name, "--max_train_steps", steps, "--checkpointing_steps", 2,
                    *extra)
        return load_file(tmp_path / name / f"step{steps - 1}" / artifacts.LORA_FILE)

    uninterrupted = run("straight", 4)
    run("resumed", 2)
    resumed = run("resumed", 4, "--resume_from_checkpoint", "latest")
    assert uninterrupted.keys() == resumed.keys()
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=1e-6, msg=key)
    return run


# ----------------------------------------------------------------------------------------------------------
# Aspect-ratio buckets
# ----------------------------------------------------------------------------------------------------------

# the demo photos at 64 px: dog_0 and dog_4 square, dog_1 and dog_3 4:3 landscape, dog_2 5:7 portrait
BUCKETS = "64,64;64,96;96,64"
EXPECTED_BUCKETS = {"dog_0.jpg": (64, 64), "dog_1.jpg": (64, 96), "dog_2.jpg": (96, 64), "dog_3.jpg": (64, 96),
                    "dog_4.jpg": (64, 64)}


def test_auto_buckets_are_sdxls_sizes_at_the_resolutions_area():
    buckets = imaging.auto_buckets(1024)
    assert {(1024, 1024), (512, 2048), (2048, 512), (832, 1216), (1216, 832), (896, 1152)} <= set(buckets)
    assert all(h % 64 == 0 and w % 64 == 0 and h * w <= 1024 ** 2 and 1 / 4 <= h / w <= 4 for h, w in buckets)
    assert all(h * w > 0.9 * 1024 ** 2 for h, w in buckets), "each keeps about the resolution's pixel count"
    assert imaging.parse_buckets("auto", 1024) == tuple(buckets)
    assert imaging.parse_buckets("64,96; 96,64;64,96", 64) == ((64, 96), (96, 64))


def test_each_photo_trains_at_its_nearest_bucket_with_the_crop_and_size_in_its_time_ids(photos, tmp_path):
    images = imaging.list_images(photos)
    data = trainer.DreamBoothDataset(images, "a photo of sks dog", images[::-1], class_prompt="a photo of dog",
                                     resolution=64, center_crop=False, random_flip=True, seed=0, num_samples=20,
                                     buckets=imaging.parse_buckets(BUCKETS, 64), batch_size=2)
    for k in range(20):
        item = data[k]
        name = images[data.instance(k)].name
        height, width = EXPECTED_BUCKETS[name]
        assert item["pixel_values"].shape == item["class_pixel_values"].shape == (3, height, width), name
        assert item["time_ids"][4:].tolist() == item["class_time_ids"][4:].tolist() == [height, width]
        original = Image.open(images[data.instance(k)]).size[::-1]
        assert item["time_ids"][:2].tolist() == list(original)


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_buckets_drop_no_photo_and_each_batch_holds_one_bucket(photos, batch_size):
    images = imaging.list_images(photos)
    data = trainer.DreamBoothDataset(images, "a photo of sks dog", resolution=64, center_crop=True, random_flip=False,
                                     seed=0, num_samples=60 * batch_size, buckets=imaging.parse_buckets(BUCKETS, 64),
                                     batch_size=batch_size)
    per_epoch = sum(-(-n // batch_size) for n in (2, 2, 1)) * batch_size
    for epoch in range(3):
        seen = set()
        for start in range(epoch * per_epoch, (epoch + 1) * per_epoch, batch_size):
            batch = trainer.collate([data[k] for k in range(start, start + batch_size)])  # stacks: one size
            names = {images[data.instance(k)].name for k in range(start, start + batch_size)}
            assert len({EXPECTED_BUCKETS[n] for n in names}) == 1, names
            seen |= names
        assert seen == set(EXPECTED_BUCKETS), f"every photo in epoch {epoch}"
    orders = [[data.instance(k) for k in range(e * per_epoch, (e + 1) * per_epoch)] for e in range(3)]
    assert len({tuple(o) for o in orders}) > 1, "each epoch has its own order"


def test_cached_bucketed_latents_train_as_encoding_every_step(models, tiny_model, photos, tmp_path):
    images = imaging.list_images(photos)
    buckets = imaging.parse_buckets(BUCKETS, 64)
    targets = trainer.latent_targets(images, images[:2], 64, buckets)
    # class images dog_0 (square) and dog_1 (landscape) at their own buckets; the portrait bucket has no class
    # image of its shape, so it draws from both
    assert targets[images[0]] == {(64, 64), (96, 64)} and targets[images[1]] == {(64, 96), (96, 64)}
    assert targets[images[2]] == {(96, 64)}
    models.latent_cache = trainer.encode_latent_cache(models.vae, targets, True, True, 0, "cpu")
    args = trainer.parse_args([str(a) for a in tiny_args(tiny_model, photos, tmp_path / "out")])
    losses = {}
    try:
        for cached in (False, True):
            data = trainer.DreamBoothDataset(images, "a photo of sks dog", images[:2], class_prompt="a photo of dog",
                                             resolution=64, center_crop=True, random_flip=True, seed=0,
                                             num_samples=12, buckets=buckets, batch_size=2, cached=cached)
            losses[cached] = []
            for start in range(0, 12, 2):
                batch = trainer.collate([data[start], data[start + 1]])
                with torch.no_grad():
                    losses[cached].append(trainer.training_step(
                        batch, models, trainer.sample_generators(0, batch, "cpu"), "cpu",
                        **trainer.method_settings(args)).item())
    finally:
        models.latent_cache = None
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_class_images_are_made_at_the_buckets_the_photos_train_at_and_drawn_by_shape(tiny_model, photos, tmp_path):
    # made square and cropped to a 2:1 bucket, a class image would be upscaled up to 2x without a word
    out = tmp_path / "out"
    run_trainer(*tiny_args(tiny_model, photos, out, "--max_train_steps", 1, "--optimizer", "adamw",
                           "--aspect_ratio_buckets", BUCKETS, "--with_prior_preservation", "--class_prompt",
                           "a photo of dog", "--num_class_images", 5, "--sample_batch_size", 2))
    made = imaging.list_images(out / "class_images")
    sizes = sorted(Image.open(p).size[::-1] for p in made)
    assert sizes == sorted(EXPECTED_BUCKETS.values()), "each photo's bucket, in the photos' proportions"
    images = imaging.list_images(photos)
    data = trainer.DreamBoothDataset(images, "a photo of sks dog", made, class_prompt="a photo of dog",
                                     resolution=64, center_crop=True, random_flip=False, seed=0, num_samples=10,
                                     buckets=imaging.parse_buckets(BUCKETS, 64), batch_size=1)
    for size, pool in data.class_pools.items():
        assert pool and all(Image.open(p).size[::-1] == size for p in pool), size


def test_the_upscaling_warning_follows_each_photos_bucket_not_resolution(tiny_model, photos, tmp_path, capsys):
    from conftest import check_inputs

    check_inputs(tiny_args(tiny_model, photos, tmp_path / "a", "--resolution", 512, "--aspect_ratio_buckets", BUCKETS))
    assert "warning" not in capsys.readouterr().err, "the photos cover their 64 and 96 px buckets"
    check_inputs(tiny_args(tiny_model, photos, tmp_path / "b", "--aspect_ratio_buckets", "128,128;128,192;192,128"))
    assert ("warning: 4 instance images are smaller than their training size (their bucket) and will be upscaled: "
            "dog_1.jpg (160x120), dog_2.jpg (112x160), dog_3.jpg (128x96), dog_4.jpg (96x96)"  # 160x120 to 192x128
            ) in capsys.readouterr().err


@pytest.mark.parametrize("value, message", [
    ("64,96;abc", "--aspect_ratio_buckets '64,96;abc': 'abc' is not 'height,width'"),
    ("64,100", "--aspect_ratio_buckets: 64x100 (height x width) needs sides that are multiples of 32 in [32, 4096]"),
    ("64,1024", "at most 8:1"),
    ("-64,64", "--aspect_ratio_buckets: -64x64 (height x width) needs sides that are multiples of 32"),
    ("auto", "--aspect_ratio_buckets auto at --resolution 64 leaves only the square"),
    (" ; ", "--aspect_ratio_buckets is empty: pass auto"),
    ("", "--aspect_ratio_buckets is empty: pass auto, or 'h,w;h,w;...', or leave it out for squares"),
])
def test_bucket_mistakes_are_one_line_before_any_model_loads(tiny_model, photos, tmp_path, value, message):
    with pytest.raises(messages.UserError, match=__import__("re").escape(message)):
        trainer.parse_args([str(a) for a in tiny_args(tiny_model, photos, tmp_path / "out", "--aspect_ratio_buckets",
                                                      value)])


def test_a_bucketed_run_resumes_to_the_uninterrupted_adapters_and_validates_at_the_common_bucket(tiny_model, photos,
                                                                                                tmp_path):
    flags = ["--aspect_ratio_buckets", BUCKETS, "--train_batch_size", 2, "--with_prior_preservation",
             "--class_prompt", "a photo of dog", "--class_dir", shutil.copytree(photos, tmp_path / "class"),
             "--num_class_images", 2, "--random_flip",
             "--optimizer", "adamw", "--learning_rate", 1e-3, "--validation_prompt", "a sks dog",
             "--num_validation_images", 1, "--validation_inference_steps", 1, "--validation_steps", 100]
    run = straight_then_resumed(tiny_args(tiny_model, photos, tmp_path / "out", *flags), tmp_path)
    respelled = ["--aspect_ratio_buckets", " 96,64 ;64,96; 64,64;"]  # the same buckets: resumes
    run("resumed", 5, *respelled, "--resume_from_checkpoint", "latest")
    with pytest.raises(messages.UserError, match=__import__("re").escape(
            "the aspect-ratio buckets [[64, 64], [64, 96], [96, 64]] (now [[64, 64], [96, 64]])")):
        run("resumed", 6, "--aspect_ratio_buckets", "64,64;96,64", "--resume_from_checkpoint", "latest")
    # two photos are 64x96 and two square: the first most common, 64x64 (dog_0 comes first)
    assert Image.open(tmp_path / "straight" / "validation" / "step3" / "seed0.png").size == (64, 64)
