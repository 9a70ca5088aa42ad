"""zephyr_fast: a performance-first trainer for the Zephyr recipe (dSFT -> AIF -> dDPO).

The top-level folder ``kernels/`` installs under the import name ``zephyr_kernels``: a top-level
``kernels`` would clash with the Hugging Face ``kernels`` package that transformers probes.
"""

from setuptools import find_packages, setup

zephyr_pkgs = find_packages(include=["zephyr_fast", "zephyr_fast.*"])
kernel_pkgs = ["zephyr_kernels"] + [
    "zephyr_kernels." + p for p in find_packages(where="kernels")
]

setup(
    name="zephyr_fast",
    version="0.1.0",
    description="Fused-kernel, padding-free, reference-free-at-train-time Zephyr (dSFT + dDPO) trainer",
    python_requires=">=3.10",
    packages=zephyr_pkgs + kernel_pkgs,
    package_dir={"zephyr_kernels": "kernels"},
    include_package_data=True,
    install_requires=[
        # ranges that torch 2.13.0 / 2.11 (GPU boxes) satisfy, so nothing newer is pulled in
        "torch>=2.4,<=2.13.0",
        "triton>=3.0; platform_system == 'Linux'",
        "transformers>=4.56",
        "datasets>=3.0",
        "safetensors",
        "tokenizers",
        "sentencepiece",
        "pyyaml",
        "tqdm",
        "numpy",
        "xxhash",  # checkpoint manifest digests (also a datasets dependency)
    ],
    extras_require={
        "cuda": ["flash-attn>=2.6"],
        "deepspeed": ["deepspeed>=0.15"],
        "lora": ["peft>=0.12"],
        "plots": ["matplotlib"],
        "anchors": ["liger-kernel>=0.5", "cut-cross-entropy>=25.1", "trl>=1.0"],
        "dev": ["pytest", "pytest-benchmark", "matplotlib"],
        "aif": ["openai>=1.0", "transformers[serving]", "matplotlib"],
        "vllm": ["vllm"],
    },
    entry_points={"console_scripts": ["zephyr-fast=zephyr_fast.cli:main"]},
)
