"""Training: fine-tuning a UNet (LoRA or full) with token merging on the forward pass,
on one device or a mesh, and the demo model's recipe.

:mod:`.trainer` (the config, the loss, LoRA adapters, the jitted step),
:mod:`.data` (image folders encoded once to latents), :mod:`.checkpoints` (resumable
checkpoints, LoRA files, loss plots), :mod:`.loop` (``train``), :mod:`.demo` (the recipe
of the built-in demo model).
"""
from .checkpoints import (latest_checkpoint, load_checkpoint, lora_state_dict, plot_losses,
                          save_checkpoint, save_lora)
from .data import encode_dataset, encode_dataset_xl, load_image_folder
from .loop import run_steps, train
from .trainer import (TrainConfig, TrainError, Trainer, TrainState, diffusion_loss, fuse_lora,
                      init_lora, lora_targets, make_optimizer, state_shardings)

__all__ = ["train", "run_steps", "TrainConfig", "TrainError", "Trainer", "TrainState",
           "diffusion_loss", "make_optimizer", "lora_targets", "init_lora", "fuse_lora",
           "state_shardings", "lora_state_dict", "save_lora", "save_checkpoint",
           "load_checkpoint", "latest_checkpoint", "plot_losses", "load_image_folder",
           "encode_dataset", "encode_dataset_xl"]
