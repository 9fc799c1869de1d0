"""The adapters as three files: the PEFT adapter, diffusers' LoRA file, and kohya's names for ComfyUI and A1111/Forge."""

import json
import re
import shutil
from pathlib import Path

import safetensors.torch
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, get_peft_model_state_dict
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from .artifacts import KOHYA_FILE, LORA_FILE, SETTINGS_FILE, partial_dir, publish, ran
from .pipeline import shared_name


def save_peft_adapter(model, folder, base_model):
    """PEFT's own layout, so `PeftModel.from_pretrained(pipe.unet, folder)` loads it."""
    config = model.peft_config["default"]
    config.base_model_name_or_path = base_model
    config.save_pretrained(str(folder))
    state = {f"base_model.model.{k}": v.detach().float().cpu().contiguous()
             for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()}
    safetensors.torch.save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def portable_lora_weights(model):
    """LoRA weights named as transformers 4, diffusers, ComfyUI and kohya name them. transformers 5's
    CLIPTextModel dropped its `text_model.` level; diffusers strips it again when the model lacks it. A text
    encoder's DoRA magnitude is named as the parameter it is (`lora_magnitude_vector.weight`): transformers 5's
    load_adapter, which diffusers loads text encoders with, leaves peft's shorter name unloaded; peft reads both."""
    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    if isinstance(model, CLIPTextModel) and not hasattr(model, "text_model"):
        state = {f"text_model.{key}": value for key, value in state.items()}
    if isinstance(model, (CLIPTextModel, CLIPTextModelWithProjection)):
        state = {f"{key}.weight" if key.endswith(".lora_magnitude_vector") else key: value
                 for key, value in state.items()}
    return state


def portable_lora_metadata(config):
    """The LoraConfig stored in the diffusers file: what diffusers reads, and what differs from the defaults.
    diffusers builds LoraConfig(**metadata), and an older peft refuses fields it doesn't know."""
    defaults = LoraConfig().to_dict()
    needed = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern")
    metadata = {key: value for key, value in config.to_dict().items() if key in needed or value != defaults.get(key)}
    if metadata.get("base_model_name_or_path"):  # the file goes to the Hub: no local path in it
        metadata["base_model_name_or_path"] = shared_name(metadata["base_model_name_or_path"])
    return metadata


def kohya_module_name(module, layers_per_block):
    """A diffusers UNet module path in SGM/kohya naming, e.g. down_blocks.1.attentions.0.x -> input_blocks.4.1.x
    (each UNet level holds layers_per_block blocks plus a down/upsampler)."""
    per_level = layers_per_block + 1
    if match := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", module):
        return f"input_blocks.{1 + per_level * int(match[1]) + int(match[2])}.1.{match[3]}"
    if match := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", module):
        return f"output_blocks.{per_level * int(match[1]) + int(match[2])}.1.{match[3]}"
    if match := re.match(r"mid_block\.attentions\.0\.(.*)", module):
        return f"middle_block.1.{match[1]}"
    return module


def kohya_state_dict(trained, lora_alpha):
    """The WebUI/ComfyUI/kohya file: lora_unet_* in SGM block names, lora_te1_*, lora_te2_*, each with alpha."""
    kohya = {}
    layers_per_block = trained[0].config.layers_per_block
    for model, prefix in zip(trained, ["lora_unet", "lora_te1", "lora_te2"]):
        for key, value in portable_lora_weights(model).items():
            module, kind = key.rsplit(".lora_", 1)  # kind: "A.weight" (down) or "B.weight" (up)
            if prefix == "lora_unet":
                module = kohya_module_name(module, layers_per_block)
            name = f"{prefix}_{module.replace('.', '_')}"
            kohya[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value.detach().float().cpu()
            kohya[f"{name}.alpha"] = torch.tensor(float(lora_alpha))
    return kohya


def save_adapters(step_dir, trained, settings, kohya=False):
    """Write stepN/{unet,text_encoder_one,text_encoder_two}/ (PEFT), stepN/pytorch_lora_weights.safetensors
    (diffusers), optionally the kohya file, and stepN/run_settings.json; then rename the folder into place."""
    step_dir = Path(step_dir)
    tmp = partial_dir(step_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    base = ran(settings)["pretrained_model_name_or_path"]
    for model, name in zip(trained, ["unet", "text_encoder_one", "text_encoder_two"]):
        save_peft_adapter(model, tmp / name, base)
    layers = [convert_state_dict_to_diffusers(portable_lora_weights(m)) for m in trained]
    metadata = [portable_lora_metadata(m.peft_config["default"]) for m in trained]
    StableDiffusionXLPipeline.save_lora_weights(
        str(tmp), unet_lora_layers=layers[0], unet_lora_adapter_metadata=metadata[0],
        text_encoder_lora_layers=layers[1] if len(layers) > 1 else None,
        text_encoder_lora_adapter_metadata=metadata[1] if len(layers) > 1 else None,
        text_encoder_2_lora_layers=layers[2] if len(layers) > 2 else None,
        text_encoder_2_lora_adapter_metadata=metadata[2] if len(layers) > 2 else None,
        weight_name=LORA_FILE)
    if kohya:
        safetensors.torch.save_file(kohya_state_dict(trained, ran(settings)["lora_alpha"]), str(tmp / KOHYA_FILE),
                                    metadata={"ss_network_module": "networks.lora"})
    (tmp / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))
    return publish(tmp, step_dir)
