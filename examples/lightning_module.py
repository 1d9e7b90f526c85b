"""fused_optim.AdamW returned from a LightningModule's configure_optimizers (Lightning calls step(closure)).

    python examples/lightning_module.py [--steps 50]
"""
import lightning.pytorch as pl
import torch

import fused_optim
from cli import run_args  # examples/cli.py (the script dir is on sys.path)


class Regressor(pl.LightningModule):
    def __init__(self, lr=1e-2, weight_decay=0.05):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.LayerNorm(64), torch.nn.GELU(),
                                       torch.nn.Linear(64, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        # biases and norm weights without weight decay; fused=None: kernels on CUDA, reference path on CPU
        return fused_optim.create_optimizer(self, "adamw", lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


if __name__ == "__main__":
    args = run_args(__doc__, steps=50)
    x = torch.randn(1024, 16)
    data = torch.utils.data.TensorDataset(x, x[:, :4].sum(1, keepdim=True).sin())
    module = Regressor()
    trainer = pl.Trainer(max_steps=args.steps, logger=False, enable_checkpointing=False)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=128, shuffle=True))
    print("optimizer:", type(trainer.optimizers[0]).__name__, "final loss:", trainer.callback_metrics["loss"].item())
