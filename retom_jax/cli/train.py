"""``retom-jax train``: fine-tune a UNet (LoRA or full), or retrain the demo model."""
from __future__ import annotations

import sys
from pathlib import Path

from ..models.weights import CheckpointError
from ..train.demo import train_demo
from ..train.checkpoints import checkpoint_info, latest_checkpoint
from ..train.loop import train
from ..train.trainer import TrainError
from .options import (DTYPES, HelpFormatter, add_merge_options, add_mesh_options,
                      check_merge_options, dtype_arg, merge_from_args, mesh_from_args,
                      positive_int)


def add_parser(sub):
    """Register ``retom-jax train``."""
    t = sub.add_parser(
        "train", help="fine-tune a Stable Diffusion UNet (LoRA or full), or train the demo model",
        formatter_class=HelpFormatter,
        description="Fine-tune the UNet of a diffusers Stable Diffusion pipeline folder on an "
                    "image folder (images + metadata.jsonl with 'file_name' and 'text'), with "
                    "token merging on the training forward pass. With --lora-rank: LoRA "
                    "adapters on the attention projections, saved as a diffusers LoRA file; "
                    "without: full fine-tuning, saved as a diffusers unet/ folder. "
                    "'retom-jax train --demo' retrains the built-in demo model.")
    t.add_argument("--demo", action="store_true",
                   help="train the demo model from scratch (its own recipe; only --out applies)")
    t.add_argument("--model", help="diffusers pipeline folder or cached repo id")
    t.add_argument("--data", help="image folder with metadata.jsonl")
    t.add_argument("--out", help="output folder (checkpoints there are resumed)")
    t.add_argument("--resolution", type=positive_int, default=512,
                   help="training image size (center crop, resize)")
    t.add_argument("--lora-rank", type=int, default=None,
                   help="LoRA rank (omit for full fine-tuning)")
    t.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    t.add_argument("--steps", type=positive_int, default=1000, help="optimizer steps")
    t.add_argument("--batch-size", type=positive_int, default=1, help="images per step")
    t.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    t.add_argument("--warmup-steps", type=int, default=0,
                   help="linear learning-rate warm-up steps, at most --steps")
    t.add_argument("--snr-gamma", type=float, default=None, help="min-SNR weighting (e.g. 5)")
    t.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None,
                   help="default: the model's scheduler's")
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm")
    t.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay")
    t.add_argument("--caption-dropout", type=float, default=0.0,
                   help="share of captions replaced by the empty prompt")
    t.add_argument("--dtype", type=dtype_arg, default="float32",
                   metavar="{" + ",".join(DTYPES) + "}",
                   help="compute dtype of the UNet; bf16, fp16, fp32 are accepted too")
    t.add_argument("--master-fp32", action="store_true",
                   help="keep a float32 master copy of low-precision trainable weights")
    t.add_argument("--save-dtype", type=dtype_arg, default="float32",
                   metavar="{" + ",".join(DTYPES) + "}", help="dtype of the saved weights")
    t.add_argument("--checkpoint-every", type=positive_int, default=500,
                   help="steps between checkpoints")
    t.add_argument("--caption-column", default="text",
                   help="the caption field of metadata.jsonl")
    t.add_argument("--seed", type=int, default=0, help="seed of initialisation and batches")
    add_merge_options(t, schedule=False)
    add_mesh_options(t, "train on a device mesh, e.g. data=4,fsdp=2: the batch over data and "
                        "fsdp (--batch-size a multiple of both), the model and the optimizer "
                        "state over fsdp; an axis left out is 1, except data, which takes the "
                        "devices left")
    t.add_argument("--no-progress", action="store_true", help="no progress line")
    t.add_argument("--allow-changes", action="store_true",
                   help="resume a run in --out although settings that define it (data, "
                        "learning rate, merge ...) changed; without it such a resume is "
                        "refused")
    t.add_argument("--overwrite", action="store_true",
                   help="replace a finished run's files in an --out that has no checkpoint "
                        "to resume")
    t.set_defaults(handler=run_train, subparser=t)
    return t


def run_train(args, parser) -> int:
    if args.demo:
        given = [f"--{k.replace('_', '-')}" for k in ("model", "data", "lora_rank", "mesh")
                 if getattr(args, k) is not None]
        if given:
            parser.error(f"--demo trains the demo model with its own recipe: {', '.join(given)} "
                         f"do not apply")
        train_demo(args.out or "demo-model")
        return 0
    missing = [f"--{k}" for k in ("model", "data", "out") if not getattr(args, k)]
    if missing:
        parser.error(f"{', '.join(missing)} required (or --demo)")
    try:
        check_merge_options(args)
        merge_from_args(args, 1)  # bad merge options fail here, before any model is read
        mesh = mesh_from_args(args)
        train(args.model, args.data, args.out, resolution=args.resolution,
              lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, steps=args.steps,
              batch_size=args.batch_size, learning_rate=args.lr,
              warmup_steps=args.warmup_steps, snr_gamma=args.snr_gamma,
              prediction_type=args.prediction_type,
              merge=(lambda level: merge_from_args(args, level)) if args.merge != "none" else None,
              dtype=args.dtype, master_fp32=args.master_fp32,
              max_grad_norm=args.max_grad_norm, weight_decay=args.weight_decay,
              caption_dropout=args.caption_dropout, checkpoint_every=args.checkpoint_every,
              caption_column=args.caption_column, seed=args.seed, save_dtype=args.save_dtype,
              progress=not args.no_progress, mesh=mesh, allow_changes=args.allow_changes,
              overwrite=args.overwrite)
    except (TrainError, CheckpointError, ValueError) as e:
        parser.error(str(e))
    except KeyboardInterrupt:
        last = latest_checkpoint(Path(args.out) / "checkpoints")
        where = (f"the last checkpoint is {last} (step {checkpoint_info(last)[0]}): run the "
                 f"same command to resume from it" if last is not None
                 else "no checkpoint was written yet")
        print(f"\nretom-jax: interrupted; {where}", file=sys.stderr)
        return 130
    return 0
