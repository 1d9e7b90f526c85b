"""fused_optim.AdamW inside Hugging Face's transformers.Trainer, on a tiny GPT-2 built from a config (no download).

    python examples/hf_trainer.py [--steps 30]

Trainer builds its weight-decay groups and LR schedule around the class we hand it (optimizer_cls_and_kwargs);
an optimizer built by hand works too: Trainer(..., optimizers=(fused_optim.AdamW(model.parameters()), None)).
"""
import tempfile

import torch
import transformers

import fused_optim
from cli import run_args  # examples/cli.py (the script dir is on sys.path)

args = run_args(__doc__, steps=30)
config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=32,
                                 bos_token_id=0, eos_token_id=0)
model = transformers.GPT2LMHeadModel(config)
rows = (torch.arange(32).repeat(64, 1) * 5 + torch.arange(64)[:, None]) % 128  # learnable synthetic sequences
data = [{"input_ids": r, "labels": r} for r in rows]

with tempfile.TemporaryDirectory() as out:
    targs = transformers.TrainingArguments(
        output_dir=out, max_steps=args.steps, per_device_train_batch_size=16, learning_rate=3e-3,
        weight_decay=0.1, logging_steps=5, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available())
    # fused=None: the Triton kernels when the params are on CUDA, the reference path on CPU
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=data,
                                   optimizer_cls_and_kwargs=(fused_optim.AdamW, {"lr": targs.learning_rate}))
    trainer.train()
opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps the optimizer
print("optimizer:", type(opt).__name__, "param groups' weight decay:", [g["weight_decay"] for g in opt.param_groups])
