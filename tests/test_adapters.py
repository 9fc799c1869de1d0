"""Saved adapters: the reference layout, reloaded through PEFT and through diffusers, with equal outputs."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dreambooth_kit import artifacts, messages, pipeline
from conftest import run_trainer, tiny_args


def test_step_dirs_follow_the_reference_layout(trained_run):
    # 4 steps, saved every 2: the k-th step is written as step{k-1}, so the run ends in step3
    assert sorted(p.name for p in trained_run.glob("step*")) == ["step1", "step3"]
    step = trained_run / "step3"
    for name in ["unet", "text_encoder_one", "text_encoder_two"]:
        assert (step / name / "adapter_config.json").is_file()
        assert (step / name / "adapter_model.safetensors").is_file()
    assert (step / "pytorch_lora_weights.safetensors").is_file()
    assert not list(trained_run.glob(".step*")), "no partial folder is left behind"


def test_step_dir_records_the_run_settings(trained_run, tiny_model):
    settings = json.loads((trained_run / "step3" / "run_settings.json").read_text())
    assert settings["pretrained_model_name_or_path"] == str(tiny_model)
    assert settings["pretrained_vae_model_name_or_path"] == str(tiny_model / "vae")
    assert settings["instance_prompt"] == "a photo of sks dog"
    assert settings["class_prompt"] == "a photo of dog"
    assert (settings["resolution"], settings["rank"], settings["step"]) == (64, 4, 4)


def test_adapter_config_keeps_rank_alpha_and_targets(trained_run):
    config = json.loads((trained_run / "step3" / "unet" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    assert set(config["target_modules"]) == {"to_q", "to_k", "to_v", "to_out.0"}
    config = json.loads((trained_run / "step3" / "text_encoder_two" / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "out_proj"}


def test_saved_weights_are_finite_and_trained(trained_run):
    weights = load_file(trained_run / "step3" / "unet" / "adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(torch.isfinite(v).all() for v in weights.values())
    assert max(v.abs().max().item() for v in lora_b) > 0, "lora_B starts at zero; training must move it"


def unet_inputs(unet, text_dim, pooled_dim):
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
    return dict(sample=sample, timestep=torch.tensor([10, 500]),
                encoder_hidden_states=torch.randn(2, 77, text_dim, generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(2, pooled_dim, generator=g), "time_ids": time_ids})


def outputs(pipe):
    """The UNet's and both text encoders' outputs on fixed inputs."""
    ids = pipe.tokenizer(["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        te1 = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        te2 = pipe.text_encoder_2(ids, output_hidden_states=True)
        inputs = unet_inputs(pipe.unet, te1.shape[-1] + te2.hidden_states[-2].shape[-1], te2[0].shape[-1])
        return pipe.unet(**inputs).sample, te1, te2.hidden_states[-2]


@pytest.fixture(scope="module")
def base_pipeline(tiny_model):
    def make():
        models = pipeline.load_models(tiny_model, tiny_model / "vae", None, None, torch.float32, "cpu")
        return pipeline.build_pipeline(models, str(tiny_model), None, None)
    return make


def test_peft_and_load_lora_weights_give_equal_outputs(trained_run, base_pipeline):
    from peft import PeftModel

    step = trained_run / "step3"
    base = outputs(base_pipeline())

    peft_pipe = base_pipeline()  # the reference snippet, corrected: the second adapter goes on text_encoder_2
    peft_pipe.unet = PeftModel.from_pretrained(peft_pipe.unet, step / "unet")
    peft_pipe.text_encoder = PeftModel.from_pretrained(peft_pipe.text_encoder, step / "text_encoder_one")
    peft_pipe.text_encoder_2 = PeftModel.from_pretrained(peft_pipe.text_encoder_2, step / "text_encoder_two")
    via_peft = outputs(peft_pipe)

    diffusers_pipe = base_pipeline()
    diffusers_pipe.load_lora_weights(step)
    via_diffusers = outputs(diffusers_pipe)

    for name, b, p, d in zip(["unet", "text_encoder", "text_encoder_2"], base, via_peft, via_diffusers):
        torch.testing.assert_close(p, d, rtol=1e-5, atol=1e-5, msg=f"{name}: PEFT and diffusers disagree")
        assert (p - b).abs().max() > 1e-4, f"{name}: the adapter changes nothing"


def test_dora_adapters_train_magnitudes_and_load_through_peft_and_diffusers_to_equal_outputs(dora_run,
                                                                                             base_pipeline):
    from peft import PeftModel

    step = dora_run / "step1"
    base_pipe = base_pipeline()
    for part, model in [("unet", base_pipe.unet), ("text_encoder_one", base_pipe.text_encoder),
                        ("text_encoder_two", base_pipe.text_encoder_2)]:
        assert json.loads((step / part / "adapter_config.json").read_text())["use_dora"], part
        weights = load_file(step / part / "adapter_model.safetensors")
        magnitudes = {k.removeprefix("base_model.model.").rsplit(".lora_magnitude_vector", 1)[0]: v
                      for k, v in weights.items() if k.endswith(".lora_magnitude_vector")}
        assert magnitudes.keys() == {k.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0]
                                     for k in weights if ".lora_A" in k}, f"{part}: one magnitude per adapted layer"
        moved = max((m - model.get_submodule(name).weight.norm(dim=1)).abs().max() for name, m in magnitudes.items())
        assert moved > 1e-3, f"{part}: the magnitudes start at the base weights' row norms; training must move them"
    base = outputs(base_pipe)

    peft_pipe = base_pipeline()
    peft_pipe.unet = PeftModel.from_pretrained(peft_pipe.unet, step / "unet")
    peft_pipe.text_encoder = PeftModel.from_pretrained(peft_pipe.text_encoder, step / "text_encoder_one")
    peft_pipe.text_encoder_2 = PeftModel.from_pretrained(peft_pipe.text_encoder_2, step / "text_encoder_two")
    via_peft = outputs(peft_pipe)

    diffusers_pipe = base_pipeline()
    diffusers_pipe.load_lora_weights(step)  # the file's metadata says use_dora: diffusers makes DoRA layers
    via_diffusers = outputs(diffusers_pipe)

    for name, b, p, d in zip(["unet", "text_encoder", "text_encoder_2"], base, via_peft, via_diffusers):
        torch.testing.assert_close(d, p, rtol=1e-5, atol=1e-5, msg=f"{name}: PEFT and diffusers disagree")
        assert (p - b).abs().max() > 1e-4, f"{name}: the adapter changes nothing"


def test_dora_magnitudes_left_at_their_initial_values_are_refused(dora_run, base_pipeline):
    # what transformers 5's load_adapter makes of peft's own name for a text encoder's magnitude (the name diffusers'
    # script writes): DoRA layers whose magnitudes keep the base weights' row norms, and a logged warning. Those
    # differ from the trained ones by too little for a sum of squares to tell.
    pipe = pipeline.apply_adapters(base_pipeline(), dora_run / "step1")
    with torch.no_grad():
        for module in pipe.text_encoder.modules():
            if "dreambooth" in (getattr(module, "lora_magnitude_vector", None) or {}):
                module.lora_magnitude_vector["dreambooth"].weight.copy_(module.get_base_layer().weight.norm(dim=1))
    with pytest.raises(messages.UserError, match="the text_encoder adapter .* did not load"):
        pipeline.check_adapters_landed(pipe, dora_run / "step1" / artifacts.LORA_FILE, "dreambooth")


def test_dora_lora_scale_zero_is_the_base_model_too(dora_run, base_pipeline):
    # peft scales only DoRA's low-rank update: at weight 0 the trained magnitudes would still act
    base = outputs(base_pipeline())
    scaled = outputs(pipeline.apply_adapters(base_pipeline(), dora_run / "step1", lora_scale=0.0))
    for b, s in zip(base, scaled):
        torch.testing.assert_close(s, b, rtol=1e-5, atol=1e-6)


def test_apply_adapters_scale_zero_is_the_base_model(trained_run, base_pipeline):
    base = outputs(base_pipeline())
    scaled = outputs(pipeline.apply_adapters(base_pipeline(), trained_run / "step3", lora_scale=0.0))
    for b, s in zip(base, scaled):
        torch.testing.assert_close(s, b, rtol=1e-5, atol=1e-6)


# The LoraConfig fields peft 0.15 (our lower bound) accepts: diffusers builds LoraConfig(**metadata) from the file,
# and an older peft refuses any field it doesn't know.
PEFT_0_15_FIELDS = {
    "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "corda_config", "eva_config",
    "exclude_modules", "fan_in_fan_out", "inference_mode", "init_lora_weights", "layer_replication",
    "layers_pattern", "layers_to_transform", "loftq_config", "lora_alpha", "lora_bias", "lora_dropout",
    "megatron_config", "megatron_core", "modules_to_save", "peft_type", "r", "rank_pattern", "revision",
    "runtime_config", "target_modules", "task_type", "trainable_token_indices", "use_dora", "use_rslora"}


def test_diffusers_file_metadata_loads_in_older_peft(trained_run):
    from safetensors import safe_open

    with safe_open(trained_run / "step3" / artifacts.LORA_FILE, "pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    fields = {key.split(".", 1)[1] for key in metadata}
    assert {"r", "lora_alpha", "target_modules", "rank_pattern"} <= fields, "what diffusers reads"
    assert fields <= PEFT_0_15_FIELDS, f"peft 0.15 would refuse {fields - PEFT_0_15_FIELDS}"
    assert (metadata["unet.r"], metadata["unet.lora_alpha"]) == (4, 8)


def test_text_encoder_weights_keep_the_text_model_level_every_loader_expects(trained_run):
    # transformers 5's CLIPTextModel has no text_model level; transformers 4, ComfyUI and A1111 need it
    keys = load_file(trained_run / "step3" / artifacts.LORA_FILE).keys()
    for component in ["text_encoder", "text_encoder_2"]:
        names = [k for k in keys if k.startswith(f"{component}.")]
        assert names and all(k.startswith(f"{component}.text_model.encoder.layers.") for k in names), component


def test_adapters_that_do_not_land_are_refused(trained_run, base_pipeline, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    # names another library version might write: diffusers would inject the layers, warn, and leave them untrained
    with safe_open(trained_run / "step3" / artifacts.LORA_FILE, "pt") as f:
        metadata = f.metadata()
    weights = {k.replace(".text_model.", ".text_modelX."): v
               for k, v in load_file(trained_run / "step3" / artifacts.LORA_FILE).items()}
    save_file(weights, tmp_path / artifacts.LORA_FILE, metadata=metadata)
    with pytest.raises(messages.UserError, match="text_encoder adapter .* did not load"):
        pipeline.apply_adapters(base_pipeline(), tmp_path)


def test_clip_l_last_layer_gets_no_adapter_since_sdxl_never_reads_it(trained_run, tiny_model):
    # SDXL reads CLIP-L's hidden_states[-2]: LoRA on its last layer would never train, and DDP would need
    # find_unused_parameters; CLIP-G's last layer feeds the pooled embedding, so it keeps its adapter
    layers = {}
    for name, folder in [("text_encoder", "text_encoder_one"), ("text_encoder_2", "text_encoder_two")]:
        config = json.loads((tiny_model / name / "config.json").read_text())
        keys = load_file(trained_run / "step3" / folder / "adapter_model.safetensors")
        layers[name] = (config["num_hidden_layers"], {int(k.split("layers.")[1].split(".")[0]) for k in keys})
    one, two = layers["text_encoder"], layers["text_encoder_2"]
    assert one[1] == set(range(one[0] - 1)), "every CLIP-L layer but the last"
    assert two[1] == set(range(two[0])), "every CLIP-G layer"


# transformers' own adapter methods that refuse peft < 0.22 from transformers 5.24 on (load_adapter, which diffusers'
# load_lora_weights uses for the text encoders, does not); peft's functions do the same work with any peft
REFUSED_SINCE_TRANSFORMERS_5_24 = ["add_adapter", "set_adapter", "disable_adapters", "enable_adapters",
                                   "active_adapters", "get_adapter_state_dict", "delete_adapter"]


def test_text_encoder_lora_trains_saves_resumes_and_renders_where_transformers_refuses_its_adapter_methods(
        tiny_model, photos, tmp_path, monkeypatch, base_pipeline):
    from transformers.integrations.peft import PeftAdapterMixin

    def refuse(*args, **kwargs):
        raise ValueError("The version of PEFT you are using is not compatible, please use a version >= 0.22.0")

    for name in REFUSED_SINCE_TRANSFORMERS_5_24:
        if hasattr(PeftAdapterMixin, name):
            monkeypatch.setattr(PeftAdapterMixin, name, refuse)
    # base_prediction and the base validation images switch the text encoders' adapters off and on again;
    # checkpointing of the text encoders needs their inputs to carry a gradient
    argv = tiny_args(tiny_model, photos, tmp_path / "out", "--train_text_encoder", "--text_encoder_lr", 1e-2,
                     "--learning_rate", 1e-2, "--optimizer", "adamw", "--with_prior_preservation", "--class_prompt",
                     "a photo of dog", "--prior_target", "base_prediction",
                     "--gradient_checkpointing", "--validation_prompt", "a photo of sks dog",
                     "--validation_compare_base", "--num_validation_images", 1, "--validation_inference_steps", 1,
                     "--checkpointing_steps", 1, "--max_train_steps", 1)
    run_trainer(*argv)
    run_trainer(*argv, "--max_train_steps", 2, "--resume_from_checkpoint", "latest")
    step = tmp_path / "out" / "step1"
    for folder in ["text_encoder_one", "text_encoder_two"]:
        weights = load_file(step / folder / "adapter_model.safetensors")
        assert max(v.abs().max().item() for k, v in weights.items() if "lora_B" in k) > 0, f"{folder} trained"
    base = outputs(base_pipeline())
    adapted = outputs(pipeline.apply_adapters(base_pipeline(), step))
    for name, b, a in zip(["unet", "text_encoder", "text_encoder_2"], base, adapted):
        assert (a - b).abs().max() > 1e-4, f"{name}: the adapter changes nothing"
