"""The adapters as three files: the PEFT adapter, diffusers' LoRA file, and kohya's names for ComfyUI and A1111/Forge."""

import json
import re
import shutil
from pathlib import Path

import safetensors.torch
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, get_peft_model_state_dict
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from .artifacts import KOHYA_FILE, LORA_FILE, SETTINGS_FILE, partial_dir, publish, ran
from .messages import UserError, counted
from .pipeline import shared_name, unbuildable_config_named

# the layer types peft puts LoRA on in these models; a target reaching any other (a norm) is peft's to refuse
LORA_LAYERS = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding)


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


def diffusers_lora_weights(model):
    """A model's LoRA weights in diffusers' naming, where diffusers' converter names them all (attention layers);
    else all in peft's: diffusers' loader reads one naming per model, and drops the other's keys, a whole
    attention LoRA beside a resnet conv's, say."""
    peft_names = portable_lora_weights(model)
    converted = convert_state_dict_to_diffusers(peft_names)
    return peft_names if any(".lora_A." in key or ".lora_B." in key for key in converted) else converted


def portable_lora_metadata(config):
    """The LoraConfig stored in the diffusers file: what diffusers reads, and what differs from the defaults.
    diffusers builds LoraConfig(**metadata), and an older peft refuses fields it doesn't know."""
    defaults = LoraConfig().to_dict()
    needed = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern")
    metadata = {key: value for key, value in config.to_dict().items() if key in needed or value != defaults.get(key)}
    if metadata.get("base_model_name_or_path"):  # the file goes to the Hub: no local path in it
        metadata["base_model_name_or_path"] = shared_name(metadata["base_model_name_or_path"])
    return metadata


# kohya's sd-scripts trains SDXL on its own copy of the SGM UNet, and ComfyUI and A1111/Forge read its files by
# the SGM names: a diffusers ResnetBlock2D's layers sit in SGM's in_layers/emb_layers/out_layers Sequentials
SGM_RESNET = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
              "conv_shortcut": "skip_connection"}
SGM_OUTSIDE_BLOCKS = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
                      "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
                      "add_embedding.linear_2": "label_emb.0.2"}
# the CLIP layers a kohya file's lora_te1_/lora_te2_ keys may name: those of kohya's CLIPAttention and CLIPMLP
# targets, the only ones ComfyUI's text-encoder key map reads
KOHYA_TEXT_ENCODER_MODULE = re.compile(r"(?:text_model\.)?(encoder\.layers\.\d+\.(?:self_attn\.[qkv]_proj|"
                                       r"self_attn\.out_proj|mlp\.fc1|mlp\.fc2))")


def kohya_module_name(module, unet_config):
    """A diffusers UNet module path in SGM/kohya naming, e.g. down_blocks.1.attentions.0.x -> input_blocks.4.1.x;
    None where SGM has no such module. Each UNet level is layers_per_block blocks plus a down/upsampler on the way
    down, layers_per_block + 1 blocks on the way up; within a block, 0 is the resnet, 1 the attention, and the
    upsampler follows them."""
    if module in SGM_OUTSIDE_BLOCKS:
        return SGM_OUTSIDE_BLOCKS[module]
    per_level = unet_config["layers_per_block"] + 1 if isinstance(unet_config["layers_per_block"], int) else None
    if per_level and (match := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(\w+)\.(\d+)\.(.+)", module)):
        side, level, kind, index, rest = match[1], int(match[2]), match[3], int(match[4]), match[5]
        first = 1 + per_level * level if side == "down" else per_level * level
        if kind == "downsamplers" and rest == "conv":
            return f"input_blocks.{first + per_level - 1}.0.op"
        if kind == "upsamplers" and rest == "conv":
            attention = "CrossAttn" in unet_config["up_block_types"][level]
            return f"output_blocks.{first + per_level - 1}.{2 if attention else 1}.conv"
        return block_module_name(f"{'input' if side == 'down' else 'output'}_blocks.{first + index}", kind, rest)
    if match := re.fullmatch(r"mid_block\.(\w+)\.(\d+)\.(.+)", module):
        # SGM's middle block is resnet, attention, resnet; SSD-1B's, without attention, keeps the resnets at 0 and 2
        position = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}.get((match[1], match[2]))
        return None if position is None else block_module_name(f"middle_block.{position}", match[1], match[3],
                                                               inner=False)
    return None


def block_module_name(block, kind, rest, inner=True):
    """A resnet's or an attention's layer inside an SGM block: block.0.in_layers.2, block.1.proj_in..."""
    if kind == "resnets" and rest in SGM_RESNET:
        return f"{block}{'.0' if inner else ''}.{SGM_RESNET[rest]}"
    if kind == "attentions":  # an attention's layers keep their diffusers names in SGM
        return f"{block}{'.1' if inner else ''}.{rest}"
    return None


def kohya_text_encoder_name(module):
    """A CLIP module path as kohya names it (text_model.encoder.layers.N...); None for one it never targets."""
    match = KOHYA_TEXT_ENCODER_MODULE.fullmatch(module)
    return f"text_model.{match[1]}" if match else None


def kohya_names(modules, unet_config):
    """{(prefix, module): its kohya name, or None where it has none} for the modules, a list per model."""
    names = {}
    for prefix, model_modules in zip(["lora_unet", "lora_te1", "lora_te2"], modules):
        for module in model_modules:
            name = (kohya_module_name(module, unet_config) if prefix == "lora_unet"
                    else kohya_text_encoder_name(module))
            names[prefix, module] = name and f"{prefix}_{name.replace('.', '_')}"
    return names


def unmapped_kohya_message(unmapped):
    """One line for the (prefix, module) pairs that kohya_names found no name for, and the ways out."""
    owners = {"lora_unet": "the UNet's", "lora_te1": "CLIP-L's", "lora_te2": "CLIP-G's"}
    shown = [f"{owners[prefix]} {module}" for prefix, module in sorted(unmapped)]
    return (f"{KOHYA_FILE} has no name for LoRA on {counted(len(unmapped), 'module')} ({', '.join(shown[:3])}"
            f"{', ...' if len(shown) > 3 else ''}): kohya's names cover the UNet and the CLIP encoders' attention "
            "and MLP layers; drop the target from UNET_TARGETS or TEXT_ENCODER_TARGETS, or pass "
            "--no-output_kohya_format")


def check_kohya_targets(model, revision, unet_targets, text_encoder_targets, train_text_encoder):
    """Before any weights load: every module the targets put LoRA on has a kohya name. The models are built
    empty from their configs, and peft's own matching says which modules the targets reach."""
    from peft.tuners.tuners_utils import check_target_module_exists  # the matching add_adapter uses
    from transformers import CLIPTextConfig

    unet_config = UNet2DConditionModel.load_config(model, subfolder="unet", revision=revision)
    # torch.device, not init_empty_weights, which makes each parameter on the CPU first: glibc then raises its mmap
    # threshold, and the UNet's streamed load leaves 1.2 GiB of heap holes in RSS (benchmarks/RESULTS.md)
    with torch.device("meta"), unbuildable_config_named(model):
        models = [(UNet2DConditionModel.from_config(unet_config), unet_targets)]
        if train_text_encoder:
            for cls, folder in [(CLIPTextModel, "text_encoder"), (CLIPTextModelWithProjection, "text_encoder_2")]:
                config = CLIPTextConfig.from_pretrained(model, subfolder=folder, revision=revision)
                models.append((cls(config), text_encoder_targets))
    modules = [[name for name, layer in built.named_modules() if isinstance(layer, LORA_LAYERS)
                and check_target_module_exists(LoraConfig(target_modules=targets), name)]  # falsy where excluded
               for built, targets in models]
    unmapped = [key for key, name in kohya_names(modules, unet_config).items() if name is None]
    if unmapped:
        raise UserError(unmapped_kohya_message(unmapped))


def kohya_state_dict(trained, lora_alpha):
    """The WebUI/ComfyUI/kohya file: lora_unet_* in SGM block names, lora_te1_*, lora_te2_*, each with alpha."""
    weights = [portable_lora_weights(model) for model in trained]
    modules = [sorted({key.rsplit(".lora_", 1)[0] for key in state}) for state in weights]
    names = kohya_names(modules, trained[0].config)
    unmapped = [key for key, name in names.items() if name is None]
    if unmapped:  # check_kohya_targets refuses these before a run; a copied script that skips it stops here
        raise UserError(unmapped_kohya_message(unmapped))
    kohya = {}
    for state, prefix in zip(weights, ["lora_unet", "lora_te1", "lora_te2"]):
        for key, value in state.items():
            module, kind = key.rsplit(".lora_", 1)  # kind: "A.weight" (down) or "B.weight" (up)
            name = names[prefix, module]
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
    layers = [diffusers_lora_weights(m) for m in trained]
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
