"""t2ray: Transformer² self-adaptive LLMs on Ray."""

__version__ = "0.1.0"
