"""rspo_mega: Megatron-core reinforcement learning for masked diffusion language models."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
VERSION = "0.1.0"

setup(
    name="rspo_mega",
    version=VERSION,
    description="RSPO / ESPO / diffu-GRPO for masked diffusion LMs (LLaDA) on megatron-core",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["rspo_mega", "rspo_mega.*"]),
    package_data={"rspo_mega": ["**/*.yaml", "models/llada/configs/*.json", "checkpoints/*/*"]},
    install_requires=[
        # Python 3.11 resolves 0.16.1 (tested here); the NGC images' Python 3.12 takes 0.19.x.
        "megatron-core>=0.16.1,<0.20",
        "psutil>=5.9",  # dist-checkpointing saves need it; megatron-core does not declare it
        # A range the local CPU build (pip install torch==2.13.0) and NGC's torch both satisfy.
        "torch>=2.6",
        "numpy>=1.26",
        "pyyaml>=6.0",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "sentencepiece>=0.2",
        "datasets>=2.19",
        "huggingface_hub>=0.25",  # hf:ORG/NAME ids through its cache (datasets needs it too)
        "sympy>=1.12",
        "tqdm>=4.66",
        "tensorboard>=2.15",
        "matplotlib>=3.8",
    ],
    extras_require={
        # peft: the LoRA export's PEFT directory is loaded by peft itself in
        # tests/training/test_lora_run.py (0.21.2 with transformers 5.25 tested; 0.17 does not
        # import with transformers 5); the trackers' packages: their tests run offline
        "test": ["pytest>=8", "pytest-timeout>=2.3", "peft==0.21.2", "wandb>=0.17",
                 "mlflow-skinny>=2.14"],
        "wandb": ["wandb>=0.17"],  # logging.wandb
        "mlflow": ["mlflow-skinny>=2.14"],  # logging.mlflow (client only; a server is separate)
        # GPU images only: never install this on a CPU machine (it breaks import megatron.core).
        "gpu": ["transformer-engine[pytorch]>=2.0"],
    },
    entry_points={
        "console_scripts": [
            "rspo-train=rspo_mega.train:main",
            "rspo-eval=rspo_mega.evaluate:main",
            "rspo-plan=rspo_mega.plan.cli:main",
        ],
    },
)
