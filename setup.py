from setuptools import find_packages, setup

setup(
    name="fused_optim",
    version="0.1.0",
    description="Fused GPU optimizers for PyTorch: torch.optim / timm.optim drop-ins with Triton and CUDA kernels",
    packages=find_packages(include=["fused_optim", "fused_optim.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "triton>=3.0"],
    extras_require={"test": ["pytest", "timm"], "bench": ["matplotlib", "tqdm"]},
)
