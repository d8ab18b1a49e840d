"""The CUDA and nccl paths, on the GPUs present (python -m pytest -m gpu); skipped without them."""
