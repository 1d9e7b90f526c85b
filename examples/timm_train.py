"""fused_optim's optimizers by name in timm's optimizer factory (timm.optim.create_optimizer_v2).

    python examples/timm_train.py --opt foadamw        # any name from the list this prints
    python -m fused_optim.integrations path/to/timm/train.py --opt foadamw ...   # timm's own train script
"""
import argparse

import torch
import timm.optim

import fused_optim.integrations

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--opt", default="foadamw")
ap.add_argument("--lr", type=float, default=1e-2)
ap.add_argument("--steps", type=int, default=20)
args = ap.parse_args()

print("fused_optim names in timm:", " ".join(fused_optim.integrations.register_timm()))
device = "cuda" if torch.cuda.is_available() else "cpu"  # fused kernels on CUDA, reference path on CPU
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.LayerNorm(64), torch.nn.GELU(),
                            torch.nn.Linear(64, 10)).to(device)
x, y = torch.randn(256, 32, device=device), torch.randint(0, 10, (256,), device=device)
# biases and norm weights get no weight decay, as timm groups them; extra kwargs (fused=...) reach our class
opt = timm.optim.create_optimizer_v2(model, args.opt, lr=args.lr, weight_decay=0.05)
print(f"{type(opt).__module__.split('.')[0]}.{type(opt).__name__}, groups' weight decay:",
      [g["weight_decay"] for g in opt.param_groups])
for step in range(args.steps):
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 5 == 0 or step == args.steps - 1:
        print(f"step {step:3d}  loss {loss.item():.4f}")
