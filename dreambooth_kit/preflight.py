"""What check_inputs() in the trainer asks before any model loads: the photos, the class folder, the base model, the
Hub, the output dir and the state to resume from. Each refusal is one line."""

import dataclasses
from pathlib import Path

from .artifacts import KOHYA_FILE, ran, remove_partial_dirs
from .checkpoints import check_resume, instance_data_sha256, model_fingerprint, run_settings
from .checks import DORA_IN_KOHYA_FILE
from .exporters import check_kohya_targets
from .imaging import (
    check_images,
    check_masks,
    list_images,
    points_nowhere,
    read_captions,
    refuse_file_as_folder,
    warn_broken_links,
    warn_left_out,
)
from .messages import UserError, counted, say, warn
from .ownership import check_output_dir, refuse_foreign_output
from .pipeline import check_hub, check_models, resolve_instance_dir, warn_long_prompts


def check_instance_photos(args, settings):
    """The instance photos (with their masks under --masked_loss) and each one's prompt: its caption file's, or
    --instance_prompt. Every file left out is named with why."""
    instance_dir = resolve_instance_dir(args.instance_dir)
    instance_images = check_masks(instance_dir, list_images(instance_dir), args.masked_loss, args.mask_floor)
    warn_broken_links(instance_dir, "instance")
    warn_left_out(instance_dir, "instance", list_images(instance_dir), settings.caption_extension)
    if not instance_images:
        raise UserError(f"no images in {instance_dir}: add 3-20 photos (jpg, png, webp, ...) of the subject")
    subfolders = [p.name for p in instance_dir.iterdir()
                  if not p.name.startswith(".") and not points_nowhere(p) and p.is_dir()]
    if subfolders:
        warn(f"subfolders of {instance_dir} are ignored: {', '.join(sorted(subfolders))}")
    check_images(instance_images, "instance", args.resolution, settings.buckets)
    return instance_images, read_captions(instance_images, args.instance_prompt, settings.caption_extension)


def check_class_folder(args, settings):
    """The class images already made (none where the folder does not exist yet: the run makes them)."""
    class_dir = settings.class_dir
    refuse_file_as_folder(class_dir, "--class_dir", "pass a folder for the class images (made if missing)")
    if not Path(class_dir).is_dir():
        return []
    warn_broken_links(class_dir, "class")
    class_images = list_images(class_dir)
    warn_left_out(class_dir, "class", class_images, settings.caption_extension, required=False)  # else filled
    check_images(class_images, "class", args.resolution)
    extra = len(class_images) - args.num_class_images
    if extra > 0:  # prepare_class_images takes the first, by name
        say(f"note: the class folder {class_dir} holds {len(class_images)} images; --num_class_images "
            f"{args.num_class_images} trains on the first by name, through "
            f"{class_images[args.num_class_images - 1].name}: the {extra} after it are not used")
    return class_images


def check_run(args, settings, instance_images, instance_prompts, lora_targets):
    """The base model, long prompts, the LoRA targets (unet, text encoders) the kohya file must name, the Hub, the
    output dir and the state to resume from. Returns the settings
    completed with the photos' checksum, the model's fingerprint and the state to resume from."""
    check_models(settings.pretrained_model_name_or_path, settings.pretrained_vae_model_name_or_path, args.revision,
                 args.variant)
    warn_long_prompts(settings.pretrained_model_name_or_path, args.revision, [
        *((image.with_suffix(settings.caption_extension).name, prompt)
          for image, prompt in zip(instance_images, instance_prompts) if prompt != args.instance_prompt),
        ("--instance_prompt", args.instance_prompt), ("--class_prompt", args.class_prompt),
        ("--validation_prompt", args.validation_prompt)])
    if args.push_to_hub:
        check_hub(args.hub_model_id, Path(settings.output_dir).name, args.hub_token)
    refuse_file_as_folder(settings.output_dir, "--output_dir", "choose another --output_dir")
    remove_partial_dirs(settings.output_dir)
    settings = dataclasses.replace(settings, instance_data_sha256=instance_data_sha256(
        instance_images, instance_prompts, args.instance_prompt),
        model_fingerprint=model_fingerprint(settings.pretrained_model_name_or_path,
                                            settings.pretrained_vae_model_name_or_path, args.revision, args.variant))
    settings = dataclasses.replace(settings, resume_state=check_resume(args, ran(run_settings(args, settings))))
    refuse_foreign_output(settings.output_dir, args)
    check_output_dir(settings.output_dir, args.overwrite_output_dir, settings.resume_state)
    if args.output_kohya_format and not settings.output_kohya_format:
        say(f"note: --use_dora writes no {KOHYA_FILE}: {DORA_IN_KOHYA_FILE}")
    if settings.output_kohya_format:  # a LoRA target kohya's names have no place for, refused before weights load
        check_kohya_targets(settings.pretrained_model_name_or_path, args.revision, *lora_targets,
                            args.train_text_encoder)
    captioned = sum(p != args.instance_prompt for p in instance_prompts)
    say(f"{captioned} of {counted(len(instance_images), 'photo')} {'has' if captioned == 1 else 'have'} a "
        f"{settings.caption_extension} caption" + ("; the others use the instance prompt" if captioned else ""))
    return settings
