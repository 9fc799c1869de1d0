"""What train_dreambooth_lora_ssd1b.py, infer.py and evaluate.py lean on, so that each script holds its own method.

    messages     UserError (a mistake the user can fix, said in one line), say/warn, counted/agree, library notices
    checks       installed versions, flag ranges, the one-line ArgumentParser, contradictory flags
    artifacts    the run's file names, atomic writes (publish: a folder renamed into place), model-path helpers
    imaging      which files are photos, reading them faithfully (bit depth, ICC, EXIF), masks, captions, buckets
    pipeline     loading the base model (local or Hub), building the SDXL pipeline, applying adapters, rendering
    rendering    infer.py's and evaluate.py's renders: a step dir's settings and adapter file checked, then drawn
    preflight    the trainer's checks of photos, class folder, base model, Hub and output dir, before any model loads
    ownership    one trainer per output dir (the lock), folders that must not overlap, replacing an earlier run
    checkpoints  resumable state: what it must match, its integrity, saving and finding it; the NaN guard
    graceful     SIGINT and SIGTERM answered the same way in every phase, and the command that resumes
    exporters    the adapters in three files: PEFT, diffusers and kohya (ComfyUI, A1111/Forge)
    model_card   the model card and the Hub push
    telemetry    time per phase and per step, and peak memory

The scripts import this package; it imports no script. Importing any of it runs nothing: no exit, no log filter.
"""
