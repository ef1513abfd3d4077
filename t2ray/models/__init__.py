"""Model specs -> (model, tokenizer): the embedded default, a tiny random Llama, local dirs, hub ids."""

from t2ray.models.loader import MODEL_ALIASES, ModelError, cache_root, compute_dtype, load_model, load_tokenizer

__all__ = ["MODEL_ALIASES", "ModelError", "cache_root", "compute_dtype", "load_model", "load_tokenizer"]
