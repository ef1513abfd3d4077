"""RL training of experts, plain PyTorch (no Ray): loss, adapters, the worker loop."""
