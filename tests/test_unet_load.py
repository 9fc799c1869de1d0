"""The UNet's load: read a few tensors at a time, so its weights file is never mapped whole beside the weights cast
from it (issue 16), and the same model as from_pretrained's in every other respect."""

import json
import shutil

import pytest
import torch
from diffusers import UNet2DConditionModel

from dreambooth_kit import messages, pipeline


def assert_same_unet(loaded, reference):
    mine, theirs = loaded.state_dict(), reference.state_dict()
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert mine[name].dtype == theirs[name].dtype and torch.equal(mine[name], theirs[name]), name
    assert {**loaded.config, "_name_or_path": None} == {**reference.config, "_name_or_path": None}
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_streamed_unet_is_from_pretrained_s(tiny_model, dtype):
    reference = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet", torch_dtype=dtype)
    loaded = pipeline.load_unet(tiny_model, None, None, dtype, "cpu")
    assert_same_unet(loaded, reference)
    assert loaded.config._name_or_path == reference.config._name_or_path


def test_the_file_is_opened_again_for_every_few_tensors(tiny_model, monkeypatch):
    """What keeps the peak down: no one opening of the file hands out more than tensors_at_once tensors, so the
    pages read through one mapping go before the next is read."""
    handed_out, real_safe_open = [], pipeline.safe_open

    class Counted:
        def __init__(self, *a, **k):
            self.inner = real_safe_open(*a, **k)

        def __enter__(self):
            handed_out.append(0)
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, name):
            handed_out[-1] += 1
            return self.inner.get_tensor(name)

    monkeypatch.setattr(pipeline, "safe_open", Counted)
    unet = pipeline.load_unet(tiny_model, None, None, torch.bfloat16, "cpu")
    tensors = len(unet.state_dict())
    assert sum(handed_out) == tensors and max(handed_out) <= 32 and len(handed_out) >= tensors // 32


def test_shards_and_bin_weights_load_as_from_pretrained_loads_them(tiny_model, tmp_path):
    reference = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    for name, options in {"shards": dict(max_shard_size="200KB"), "bin": dict(safe_serialization=False)}.items():
        model = tmp_path / name
        shutil.copytree(tiny_model, model, ignore=shutil.ignore_patterns("unet"))
        reference.save_pretrained(model / "unet", **options)
        files = pipeline.safetensors_files(model, "unet", "diffusion_pytorch_model", None, None)
        assert len(files) > 1 if name == "shards" else files == []  # .bin: from_pretrained's own load
        assert_same_unet(pipeline.load_unet(model, None, None, torch.float32, "cpu"), reference)


def test_a_damaged_or_mismatched_unet_file_is_refused_in_one_line(tiny_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(messages.UserError, match=r"^cannot load .*: unet/diffusion_pytorch_model.safetensors is "
                                                r"unreadable \(.*\); download the model again$"):
        pipeline.load_unet(model, None, None, torch.float32, "cpu")

    weights.write_bytes(data)
    config = json.loads((model / "unet" / "config.json").read_text())
    config["block_out_channels"] = [2 * c for c in config["block_out_channels"]]  # weights of another model
    (model / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(messages.UserError, match=r"^cannot load .*: its UNet weights do not fit its config "
                                                r"\(.*\); download the model again$") as refusal:
        pipeline.load_unet(model, None, None, torch.float32, "cpu")
    assert "\n" not in str(refusal.value)


def test_a_unet_file_missing_a_tensor_is_refused_in_one_line(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    dropped = sorted(tensors)[0]
    save_file({name: t for name, t in tensors.items() if name != dropped}, weights)
    with pytest.raises(messages.UserError, match=rf"^cannot load .*: its UNet weights do not fit its config \(1 "
                                                rf"tensor missing, 0 unknown, e.g. {dropped}\); download"):
        pipeline.load_unet(model, None, None, torch.float32, "cpu")


def test_a_shard_index_without_shards_is_refused_in_one_line(tiny_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model, ignore=shutil.ignore_patterns("unet"))
    UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet").save_pretrained(model / "unet",
                                                                                       max_shard_size="200KB")
    index = model / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": ["not", "a", "map"]}))
    with pytest.raises(messages.UserError, match=r"^--pretrained_model_name_or_path .*: unet/diffusion_pytorch_model"
                                                r"\.safetensors\.index\.json lists no shards: download the model again$"):
        pipeline.load_unet(model, None, None, torch.float32, "cpu")


@pytest.mark.parametrize("source, dtype", [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)])
def test_a_cast_between_half_precisions_through_fp32_pieces_is_torchs_bit_for_bit(source, dtype):
    """On a CPU, fp16 <-> bf16 goes through fp32 a scratch-sized piece at a time (issue 16: torch's direct copy
    is about 4x slower there); rounding, overflow, subnormals, signed zeros and NaN must come out as torch's."""
    torch.manual_seed(0)
    scale = 10.0 ** torch.randint(-9, 6, (3991,))
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 65504.0, 6e-8, 3e38, -1e-40])
    values = torch.cat([torch.randn(3991) * scale, special]).to(source).reshape(2, -1)
    cast, expected = pipeline.cast(values, dtype, "cpu", torch.empty(333)), values.to(dtype)
    assert cast.dtype == dtype and cast.shape == values.shape
    nan = expected.isnan()
    assert torch.equal(cast.isnan(), nan) and nan.sum() == 1  # a NaN's sign bit may differ: it is NaN either way
    assert torch.equal(cast[~nan].view(torch.int16), expected[~nan].view(torch.int16))
    assert pipeline.cast(values, torch.float32, "cpu", torch.empty(333)).dtype == torch.float32  # other casts: .to


@pytest.mark.parametrize("stored, dtype", [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)])
def test_a_half_precision_file_loads_in_the_other_as_from_pretrained_loads_it(tiny_model, tmp_path, monkeypatch,
                                                                              stored, dtype):
    """SSD-1B's fp16 weights trained in bf16 on a CPU: the pieced cast gives from_pretrained's weights exactly,
    also for tensors that span many pieces."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model, ignore=shutil.ignore_patterns("unet"))
    UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet", torch_dtype=stored).save_pretrained(
        model / "unet")
    reference = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype)
    real = pipeline.stream_weights
    monkeypatch.setattr(pipeline, "stream_weights", lambda *a, **k: real(*a, **k, scratch_size=1000))
    assert max(t.numel() for t in reference.state_dict().values()) > 10 * 1000
    assert_same_unet(pipeline.load_unet(model, None, None, dtype, "cpu"), reference)
