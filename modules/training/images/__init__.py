"""Image training (SD 1.5 / SDXL LoRA, DreamBooth, full fine-tuning) and the files it reads and writes.

Built on peft + accelerate + diffusers; shares the run directory, checkpoints and metrics of
``modules.training``. The data side: ``dataset`` (kohya-style ``N_concept`` folders, checked images and
captions), ``buckets`` (aspect-ratio buckets), ``captions`` (dropout, shuffle, keep-tokens), ``latent_cache``,
``sampler`` (a resumable bucket batch sampler) and ``preview`` (what the UI shows of a dataset). The output
side: ``lora_targets`` names the layers a LoRA trains (kohya's choice and names), ``kohya_format`` turns a peft
LoRA into a kohya ``.safetensors`` file and back, ``kohya_metadata`` writes kohya's ``ss_*`` training record,
``diffusers_lora`` the diffusers-format file. The training: ``config`` (ImageTrainConfig) and ``presets``,
``base_model`` (the base found and loaded through Atelier's loader, LoRA layers added), ``finetune`` (full
fine-tuning, random-init builds, checkpoint output), ``loss``, ``trainer`` (the accelerate loop, checkpoints,
exact resume), ``dreambooth`` (prior preservation: paired instance/class batches, the DreamBooth trainer) with
``class_images`` (class images drawn by the base model through the txt2img engine), ``samples`` and
``train_command`` (the ``lora``, ``finetune`` and ``dreambooth`` commands' body).
"""
