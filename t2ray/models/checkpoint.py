"""A model's safetensors checkpoint read one block at a time: a tensor-parallel rank reads only its shard."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open


class Checkpoint:
    """Tensor name -> file of a Hugging Face model folder (one file, or sharded with model.safetensors.index.json)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            self.files = {k: self.folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        else:
            self.files = {}
            for path in sorted(self.folder.glob("*.safetensors")):
                with safe_open(path, "pt") as f:
                    self.files.update(dict.fromkeys(f.keys(), path))
        if not self.files:
            raise FileNotFoundError(f"no safetensors weights in {self.folder}")

    def config(self) -> dict:
        return json.loads((self.folder / "config.json").read_text())

    def _slice(self, name: str, read):
        if name not in self.files:
            raise KeyError(f"{name} is not in the checkpoint at {self.folder}")
        with safe_open(self.files[name], "pt") as f:
            return read(f.get_slice(name))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name, lambda s: s.get_shape()))

    def read(self, name: str, rows: slice = slice(None), cols: slice = slice(None)) -> torch.Tensor:
        """W[rows, cols] of a 2-D tensor, read from disk without loading the rest."""
        return self._slice(name, lambda s: s[rows, cols])


def local_checkpoint(spec: str) -> Checkpoint:
    """The checkpoint of a model spec (alias, folder, or hub id: its local snapshot, downloaded if missing)."""
    from t2ray.models.loader import resolve

    where = resolve(spec)
    if not Path(where).is_dir():
        from huggingface_hub import snapshot_download

        where = snapshot_download(str(where), allow_patterns=["*.safetensors", "*.json"])
    return Checkpoint(where)
