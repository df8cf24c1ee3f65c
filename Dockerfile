# rspo_mega for GPU clusters.
#   docker build -t rspo_mega:latest .
#   docker run --gpus all --ipc=host --rm rspo_mega:latest rspo-train --dry-run
# The NGC PyTorch image carries CUDA, NCCL, Transformer Engine and NVIDIA apex (Python 3.12), so
# megatron-core resolves to 0.19.x here. Never install the PyPI package named "apex".
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TORCH_NCCL_ASYNC_ERROR_HANDLING=1

WORKDIR /opt/rspo_mega
COPY setup.py README.md ./
COPY rspo_mega ./rspo_mega
COPY tools ./tools
COPY examples ./examples
COPY benchmarks ./benchmarks

# The image's torch and Transformer Engine are kept (the NGC pip constraint pins them).
RUN pip install --no-cache-dir "megatron-core>=0.19,<0.20" \
 && pip install --no-cache-dir -e ".[test]" \
 && python -c "import megatron.core, transformer_engine.pytorch, rspo_mega; print('rspo_mega image ok')"

WORKDIR /workspace
CMD ["rspo-train", "--help"]
