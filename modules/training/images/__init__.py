"""Image training (SD 1.5 / SDXL LoRA, DreamBooth, full fine-tuning) and the files it writes.

Built on peft + accelerate + diffusers; shares the run directory, checkpoints and metrics of
``modules.training``. ``lora_targets`` names the layers a LoRA trains (kohya's choice and names),
``kohya_format`` turns a peft LoRA into a kohya ``.safetensors`` file and back, ``kohya_metadata``
writes kohya's ``ss_*`` training record, ``diffusers_lora`` the diffusers-format file.
"""
