"""SVF experts and mixtures: the one file format t2ray reads and writes.

An expert holds, per adapted weight matrix (named by its HF module path, e.g.
``model.layers.0.mlp.gate_proj``), a 1-D float32 vector ``p`` of raw pre-sigmoid
parameters of length ``r = min(m, n)``; the singular-value scales are
``z = sigmoid(p) * max_mult``.

Files:
- expert: ``.safetensors``; one tensor per module, all metadata JSON-encoded under
  the single header key ``"t2ray"``.
- mixture: JSON listing expert files and their weights ``alpha`` — or LoRA adapter folders (PEFT's format,
  read by ``t2ray.lora.layer``) and one weight per adapter; one mixture names one kind.

Compatibility rules (applied by :func:`check_expert`, hence by every loader):
- Same base model (fingerprints equal): the expert's modules must be a *subset* of
  the base's adapted modules, with equal lengths. Modules it does not cover stay at
  identity (z = 1), so experts trained on fewer modules, or imported from a run that
  adapted fewer, remain usable.
- Another base model (transfer, opt-in with ``allow_transfer``): the expert's module
  layout must equal the base's exactly (same names, same lengths); equal shapes is
  the only evidence that the vectors mean anything there.

Pure data layer: depends on torch, safetensors and json only (no ray/transformers).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

FORMAT_VERSION = 1
EXPERT_KIND = "t2ray-svf-expert"
MIXTURE_KIND = "t2ray-mixture"
HEADER_KEY = "t2ray"
OFFICIAL_FORMAT = "sakana-self-adaptive-llms"

_FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class ExpertError(ValueError):
    """A bad expert / mixture file or argument. The message is one user-facing line."""


@dataclass(frozen=True)
class BaseModelInfo:
    """What the running base model says about itself (built by the SVF layer)."""

    model_id: str
    fingerprint: str
    module_ranks: dict[str, int]  # adapted module name -> r (length of z), in model order


@dataclass
class Expert:
    """One SVF expert: raw parameters p per module (insertion order = module order)."""

    name: str
    params: dict[str, torch.Tensor]
    base_model: str
    fingerprint: str
    max_mult: float = 1.0
    task: str | None = None
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    created: str | None = None  # UTC ISO time; set on save, kept on load

    @property
    def modules(self) -> list[str]:
        return list(self.params)

    def z(self) -> dict[str, torch.Tensor]:
        """Singular-value scales z = sigmoid(p) * max_mult, per module."""
        return {m: torch.sigmoid(p.float()) * self.max_mult for m, p in self.params.items()}

    def metadata(self) -> dict:
        """The full JSON header written to the file (see module docstring)."""
        from t2ray import __version__  # the package itself; no other t2ray module

        return {
            "format_version": FORMAT_VERSION,
            "kind": EXPERT_KIND,
            "name": self.name,
            "base_model": {"id": self.base_model, "fingerprint": self.fingerprint},
            "modules": [[m, int(p.numel())] for m, p in self.params.items()],
            "parametrisation": {"kind": "sigmoid", "max_mult": float(self.max_mult)},
            "task": self.task,
            "training": self.training,
            "metrics": self.metrics,
            "created": self.created or _utc_now(),
            "t2ray_version": __version__,
        }


# ----------------------------------------------------------------------------- helpers


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _short(fingerprint: str) -> str:
    return fingerprint[:12] + ("…" if len(fingerprint) > 12 else "")


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _to_json(obj: Any, what: str, path: Path) -> str:
    try:
        return json.dumps(obj, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ExpertError(
            f"{path.name}: {what} is not JSON-serialisable ({e}); pass plain numbers, strings, lists and dicts"
        ) from None


def _read_bytes(path: Path, what: str = "expert file") -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ExpertError(f"{path}: {what} not found; check the path") from None
    except OSError as e:
        raise ExpertError(f"{path}: cannot read {what} ({e.strerror or e}); check the path and permissions") from None


# ----------------------------------------------------------------------------- expert files


def save_expert(expert: Expert, path) -> Path:
    """Write ``expert`` to ``path`` (safetensors) atomically; refuses NaN/inf params."""
    path = Path(path)
    where = f"refusing to save expert '{expert.name}' to {path.name}"
    if not isinstance(expert.name, str) or not expert.name:
        raise ExpertError(f"{path.name}: expert name must be a non-empty string")
    if not expert.params:
        raise ExpertError(f"{where}: it has no modules")
    if not _finite_positive(expert.max_mult):
        raise ExpertError(f"{where}: max_mult must be a finite number > 0, got {expert.max_mult!r}")
    tensors = {}
    for module, p in expert.params.items():
        if not isinstance(module, str) or not module:
            raise ExpertError(f"{where}: module names must be non-empty strings, got {module!r}")
        if not isinstance(p, torch.Tensor) or p.ndim != 1 or p.numel() == 0 or not p.is_floating_point():
            raise ExpertError(f"{where}: module {module} must be a non-empty 1-D float tensor")
        p = p.detach().to("cpu", torch.float32).contiguous().clone()
        if not torch.isfinite(p).all():
            raise ExpertError(
                f"{where}: module {module} has NaN/inf values; fix training (lower lr / clip) before saving"
            )
        tensors[module] = p
    meta = expert.metadata()
    header = _to_json(meta, "expert metadata (training/metrics)", path)
    _atomic_write(path, _st_save(tensors, metadata={HEADER_KEY: header}))
    return path


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _parse_file_header(data: bytes, path: Path) -> tuple[dict, dict]:
    """Split a safetensors file into (tensor index, validated t2ray metadata)."""
    corrupt = f"{path.name}: not a valid expert file (corrupt or truncated); re-save or re-download it"
    if len(data) < 8:
        raise ExpertError(corrupt)
    n = int.from_bytes(data[:8], "little")
    if n < 2 or n > len(data) - 8:
        raise ExpertError(corrupt)
    try:
        index = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, ValueError):
        raise ExpertError(corrupt) from None
    if not isinstance(index, dict):
        raise ExpertError(corrupt)
    st_meta = index.pop("__metadata__", None) or {}
    try:  # every tensor's bytes must be inside the file
        data_len = max((int(v["data_offsets"][1]) for v in index.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise ExpertError(corrupt) from None
    if data_len != len(data) - 8 - n:
        raise ExpertError(corrupt)
    if not isinstance(st_meta, dict) or HEADER_KEY not in st_meta:
        raise ExpertError(
            f"{path.name}: safetensors file without a '{HEADER_KEY}' header, so not a t2ray expert; "
            "import official Transformer² files with `t2ray experts import`"
        )
    try:
        meta = json.loads(st_meta[HEADER_KEY])
    except (TypeError, ValueError):
        raise ExpertError(
            f"{path.name}: the '{HEADER_KEY}' header is not valid JSON; the file was edited or damaged"
        ) from None
    _validate_metadata(meta, index, path)
    return index, meta


def _validate_metadata(meta: Any, index: dict, path: Path) -> None:
    def bad(what: str) -> ExpertError:
        return ExpertError(f"{path.name}: invalid expert header: {what}; re-save the expert with t2ray")

    if not isinstance(meta, dict) or meta.get("kind") != EXPERT_KIND:
        raise bad(f"kind is not '{EXPERT_KIND}'")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise bad(f"format_version {version!r} is not a positive integer")
    if version > FORMAT_VERSION:
        raise ExpertError(
            f"{path.name}: expert format version {version} is newer than this t2ray supports "
            f"({FORMAT_VERSION}); upgrade t2ray"
        )
    if not isinstance(meta.get("name"), str) or not meta["name"]:
        raise bad("missing name")
    base = meta.get("base_model")
    if not isinstance(base, dict) or not all(isinstance(base.get(k), str) for k in ("id", "fingerprint")):
        raise bad("base_model must have string 'id' and 'fingerprint'")
    param = meta.get("parametrisation")
    if not isinstance(param, dict) or param.get("kind") != "sigmoid" or not _finite_positive(param.get("max_mult")):
        raise ExpertError(
            f"{path.name}: unknown parametrisation {param!r} (this t2ray knows "
            "{'kind': 'sigmoid', 'max_mult': > 0}); upgrade t2ray or re-save the expert"
        )
    if meta.get("task") is not None and not isinstance(meta["task"], str):
        raise bad("task must be a string or null")
    for key in ("training", "metrics"):
        if not isinstance(meta.get(key, {}), dict):
            raise bad(f"{key} must be an object")
    modules = meta.get("modules")
    if (
        not isinstance(modules, list)
        or not modules
        or not all(
            isinstance(x, list) and len(x) == 2 and isinstance(x[0], str) and type(x[1]) is int and x[1] > 0
            for x in modules
        )
    ):
        raise bad("modules must be a non-empty list of [name, length] pairs")
    names = [m for m, _ in modules]
    if len(set(names)) != len(names):
        raise bad("duplicate module names")
    for module, length in modules:
        entry = index.get(module)
        if entry is None:
            raise bad(f"module {module} is declared but has no tensor")
        if entry.get("dtype") not in _FLOAT_DTYPES or entry.get("shape") != [length]:
            raise bad(
                f"tensor {module} must be 1-D float of length {length}, got {entry.get('dtype')} {entry.get('shape')}"
            )
    extra = [k for k in index if k not in set(names)]
    if extra:
        raise bad(f"tensor {extra[0]} is not in the module list")


def load_expert(path, base: BaseModelInfo | None = None, *, allow_transfer: bool = False) -> Expert:
    """Read and validate an expert file; with ``base``, also check it fits that model."""
    path = Path(path)
    data = _read_bytes(path)
    _, meta = _parse_file_header(data, path)
    try:
        tensors = _st_load(data)
    except Exception:  # safetensors raises its own error type for any malformed byte
        raise ExpertError(
            f"{path.name}: not a valid expert file (corrupt or truncated); re-save or re-download it"
        ) from None
    params = {}
    for module, _ in meta["modules"]:
        p = tensors[module].to(torch.float32)
        if not torch.isfinite(p).all():
            raise ExpertError(
                f"{path.name}: module {module} contains NaN/inf values; the expert is unusable, retrain or re-save it"
            )
        params[module] = p
    expert = Expert(
        name=meta["name"],
        params=params,
        base_model=meta["base_model"]["id"],
        fingerprint=meta["base_model"]["fingerprint"],
        max_mult=float(meta["parametrisation"]["max_mult"]),
        task=meta.get("task"),
        training=meta.get("training", {}),
        metrics=meta.get("metrics", {}),
        created=meta.get("created"),
    )
    if base is not None:
        check_expert(expert, base, allow_transfer=allow_transfer, source=path.name)
    return expert


def expert_info(path) -> dict:
    """The validated metadata of an expert file, without loading its tensors."""
    path = Path(path)
    _, meta = _parse_file_header(_read_bytes(path), path)
    return meta


def check_expert(
    expert: Expert, base: BaseModelInfo, *, allow_transfer: bool = False, source: str | None = None
) -> None:
    """Raise ExpertError unless ``expert`` can be applied to ``base`` (rules: module docstring)."""
    label = f"expert '{expert.name}'" + (f" ({source})" if source else "")
    lengths = {m: int(p.numel()) for m, p in expert.params.items()}
    if expert.fingerprint == base.fingerprint:
        for module, length in lengths.items():
            if module not in base.module_ranks:
                raise ExpertError(
                    f"{label}: module {module} is not adapted in {base.model_id}; "
                    "adapt the same modules the expert was trained on"
                )
            if base.module_ranks[module] != length:
                raise ExpertError(
                    f"{label}: module {module} has length {length}, {base.model_id} has "
                    f"{base.module_ranks[module]}; the file does not belong to this model"
                )
        return
    if not allow_transfer:
        raise ExpertError(
            f"{label} was trained for base model {expert.base_model} (fingerprint {_short(expert.fingerprint)}), "
            f"not {base.model_id} (fingerprint {_short(base.fingerprint)}); "
            "pass --allow-transfer to apply it to a model with equal shapes"
        )
    refuse = f"{label}: cannot transfer to {base.model_id}, module layouts differ"
    for module, rank in base.module_ranks.items():
        if module not in lengths:
            raise ExpertError(f"{refuse}: module {module} is missing from the expert")
        if lengths[module] != rank:
            raise ExpertError(
                f"{refuse}: module {module} has length {lengths[module]} in the expert, {rank} in the model"
            )
    for module in lengths:
        if module not in base.module_ranks:
            raise ExpertError(f"{refuse}: module {module} is not adapted in the model")


# ----------------------------------------------------------------------------- mixing


def one_hot(index: int, num_experts: int) -> list[float]:
    """α that selects expert ``index`` out of ``num_experts``."""
    if not 0 <= index < num_experts:
        raise ExpertError(f"one_hot: index {index} out of range for {num_experts} experts")
    return [1.0 if k == index else 0.0 for k in range(num_experts)]


def common_modules(experts: Sequence[Expert]) -> list[str]:
    """The experts' shared module list; ExpertError naming the first module that differs."""
    if not experts:
        raise ExpertError("no experts to mix; give at least one")
    first = experts[0]
    layout = {m: p.numel() for m, p in first.params.items()}
    for e in experts[1:]:
        other = {m: p.numel() for m, p in e.params.items()}
        for module in list(layout) + [m for m in other if m not in layout]:
            if layout.get(module) != other.get(module):
                raise ExpertError(
                    f"cannot mix experts '{first.name}' and '{e.name}': module {module} "
                    f"has length {layout.get(module)} vs {other.get(module)} (None = absent); "
                    "mix experts with identical module layouts"
                )
    return list(layout)


def alpha_matrix(alpha, num_experts: int, modules: list[str] | None = None) -> torch.Tensor:
    """Validate α and return it as a float32 (K, M) tensor ((K,) or (K, ?) if modules is None)."""
    K = num_experts
    M = len(modules) if modules is not None else None
    expected = f"({K},) or ({K}, {M if M is not None else 'M'})"
    try:
        a = alpha.to(torch.float32) if isinstance(alpha, torch.Tensor) else torch.as_tensor(alpha, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise ExpertError(f"alpha must be an array of numbers of shape {expected}, got {alpha!r}") from None
    if not (a.shape == (K,) or (a.ndim == 2 and a.shape[0] == K and (M is None or a.shape[1] == M))):
        raise ExpertError(f"alpha has shape {tuple(a.shape)}; expected {expected} (K experts, M modules)")
    check = a.detach()
    if not torch.isfinite(check).all():
        raise ExpertError("alpha contains NaN/inf; use finite, non-negative weights")
    if (check < 0).any():
        raise ExpertError("alpha contains negative weights; use non-negative weights")
    if a.ndim == 1:
        if not (check > 0).any():
            raise ExpertError("alpha is all zero; give at least one expert a positive weight")
        return a if M is None else a[:, None].expand(K, M)
    dead = (check > 0).sum(0) == 0
    if dead.any():
        j = int(dead.nonzero()[0])
        where = f"module {modules[j]}" if modules is not None else f"column {j}"
        raise ExpertError(f"alpha is all zero for {where}; give each module at least one positive weight")
    return a


def mix_z(experts: Sequence[Expert], alpha) -> dict[str, torch.Tensor]:
    """z' = Σ_k α_k z_k per module; α is (K,) per expert or (K, M) per expert per module.

    α may be a list, numpy array or tensor (a tensor requiring grad stays differentiable).
    """
    experts = list(experts)
    modules = common_modules(experts)
    a = alpha_matrix(alpha, len(experts), modules)
    zs = [e.z() for e in experts]
    mixed = {}
    for j, module in enumerate(modules):
        acc = a[0, j] * zs[0][module]
        for k in range(1, len(experts)):
            acc = acc + a[k, j] * zs[k][module]
        mixed[module] = acc
    return mixed


# ----------------------------------------------------------------------------- mixture files


@dataclass
class Mixture:
    """A weighted set of experts. ``alpha``: one weight per expert, or per expert per module."""

    experts: list[str]
    alpha: list[float] | list[list[float]]
    name: str = "mixture"
    task: str | None = None
    metadata: dict = field(default_factory=dict)


def _relative_to(target: Path, folder: Path) -> str:
    try:
        return os.path.relpath(target.resolve(), folder.resolve())
    except ValueError:  # e.g. another drive on Windows
        return str(target.resolve())


def save_mixture(mixture: Mixture, path) -> Path:
    """Write a mixture JSON; expert paths are stored relative to its folder when possible."""
    path = Path(path)
    if not mixture.experts:
        raise ExpertError(f"refusing to save mixture {path.name}: it lists no experts")
    alpha_matrix(mixture.alpha, len(mixture.experts), None)
    alpha = torch.as_tensor(mixture.alpha, dtype=torch.float64).tolist()  # plain floats for JSON
    doc = {
        "format_version": FORMAT_VERSION,
        "kind": MIXTURE_KIND,
        "name": mixture.name,
        "task": mixture.task,
        "experts": [_relative_to(Path(p), path.parent) for p in mixture.experts],
        "alpha": alpha,
        "metadata": mixture.metadata,
    }
    text = _to_json(doc, "mixture", path)
    _atomic_write(path, json.dumps(json.loads(text), indent=2).encode() + b"\n")
    return path


def read_mixture(path) -> Mixture:
    """Read and validate a mixture JSON (the file only: its experts are read by ``t2ray.library.load_mixture``).

    Relative expert paths resolve against the mixture's folder; the returned Mixture holds
    the resolved paths.
    """
    path = Path(path)
    text = _read_bytes(path, "mixture file").decode("utf-8", errors="replace")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ExpertError(
            f"{path.name}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}; fix the file"
        ) from None

    def bad(what: str) -> ExpertError:
        return ExpertError(f"{path.name}: invalid mixture: {what}; re-save it with t2ray")

    if not isinstance(doc, dict) or doc.get("kind") != MIXTURE_KIND:
        raise bad(f"kind is not '{MIXTURE_KIND}'")
    version = doc.get("format_version")
    if type(version) is not int or version < 1:
        raise bad(f"format_version {version!r} is not a positive integer")
    if version > FORMAT_VERSION:
        raise ExpertError(
            f"{path.name}: mixture format version {version} is newer than this t2ray supports "
            f"({FORMAT_VERSION}); upgrade t2ray"
        )
    files = doc.get("experts")
    if not isinstance(files, list) or not files or not all(isinstance(f, str) and f for f in files):
        raise bad("'experts' must be a non-empty list of file paths")
    if doc.get("task") is not None and not isinstance(doc["task"], str):
        raise bad("task must be a string or null")
    if not isinstance(doc.get("metadata", {}), dict):
        raise bad("metadata must be an object")
    resolved = [Path(f) if Path(f).is_absolute() else path.parent / f for f in files]
    for stored, file in zip(files, resolved, strict=True):
        if not file.exists():
            raise ExpertError(
                f"{path.name}: expert '{stored}' not found (looked at {file}); "
                "fix the path or keep experts next to the mixture"
            )
    try:
        alpha_matrix(doc.get("alpha"), len(files), None)
    except ExpertError as e:
        raise ExpertError(f"{path.name}: {e}") from None
    return Mixture(
        experts=[str(f) for f in resolved],
        alpha=doc["alpha"],
        name=str(doc.get("name", "mixture")),
        task=doc.get("task"),
        metadata=doc.get("metadata", {}),
    )


def parse_mix_spec(spec: str) -> tuple[list[str], list[float]]:
    """Parse ``"a.safetensors:0.5,b.safetensors:0.5"`` into (paths, weights)."""
    usage = "expected 'path:weight,path:weight' such as 'math.safetensors:0.5,code.safetensors:0.5'"
    paths, weights = [], []
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            raise ExpertError(f"mix spec {spec!r}: empty entry; {usage}")
        path, sep, weight = item.rpartition(":")
        path = path.strip()
        if not sep or not path:
            raise ExpertError(f"mix spec {spec!r}: entry {item!r} is not path:weight; {usage}")
        try:
            w = float(weight)
        except ValueError:
            raise ExpertError(
                f"mix spec {spec!r}: weight {weight.strip()!r} of {path} is not a number; {usage}"
            ) from None
        if not math.isfinite(w) or w < 0:
            raise ExpertError(f"mix spec {spec!r}: weight of {path} must be a finite number >= 0, got {weight.strip()}")
        paths.append(path)
        weights.append(w)
    if not any(w > 0 for w in weights):
        raise ExpertError(f"mix spec {spec!r}: all weights are zero; give at least one expert a positive weight")
    return paths, weights


# ----------------------------------------------------------------------------- official format


def _tensor_dicts(obj: Any, depth: int = 0) -> list[dict]:
    """All dicts (searched up to 3 levels deep) whose values are all tensors."""
    if not isinstance(obj, dict) or not obj:
        return []
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return [obj]
    if depth >= 3:
        return []
    return [d for v in obj.values() for d in _tensor_dicts(v, depth + 1)]


def import_official(path, base: BaseModelInfo, *, name: str, task: str | None = None, max_mult: float = 1.0) -> Expert:
    """Convert an official Transformer² ``policy_params.pt`` into an Expert for ``base``.

    The file maps ``"<module>.weight"`` to raw pre-sigmoid params (float32 or bf16),
    possibly nested under one key. It is read with ``torch.load(weights_only=True)``, so
    files holding arbitrary objects are refused. The official code adapts MLP matrices
    only; base modules absent from the file are left at identity (a subset expert,
    recorded in ``training["imported_from"]``).
    """
    path = Path(path)
    if not _finite_positive(max_mult):
        raise ExpertError(f"{path.name}: max_mult must be a finite number > 0, got {max_mult!r}")
    if not path.is_file():
        raise ExpertError(f"{path}: official parameter file not found; check the path")
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # UnpicklingError for disallowed objects; various errors for damaged files
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExpertError(
            f"{path.name}: cannot load as a plain tensor file with weights_only=True ({first_line}); "
            "only official policy_params.pt files of tensors can be imported"
        ) from None
    found = _tensor_dicts(obj)
    if len(found) != 1:
        what = "no dict of tensors" if not found else f"{len(found)} dicts of tensors"
        raise ExpertError(
            f"{path.name}: expected one dict of '<module>.weight' -> tensor, found {what}; "
            "pass the policy_params.pt saved by the official trainer"
        )
    by_module = {}
    for key, t in found[0].items():
        module = key[: -len(".weight")] if isinstance(key, str) and key.endswith(".weight") else key
        if not isinstance(module, str) or module not in base.module_ranks:
            raise ExpertError(
                f"{path.name}: parameter {key!r} is not an adapted module of {base.model_id}; "
                "adapt the same modules as the official run (MLP matrices by default)"
            )
        if t.ndim != 1 or not t.is_floating_point() or t.numel() != base.module_ranks[module]:
            raise ExpertError(
                f"{path.name}: parameter {key} has shape {tuple(t.shape)} ({t.dtype}), "
                f"{base.model_id} needs a float vector of length {base.module_ranks[module]}; "
                "was it trained on another model?"
            )
        p = t.detach().to(torch.float32).contiguous()
        if not torch.isfinite(p).all():
            raise ExpertError(
                f"{path.name}: parameter {key} contains NaN/inf values; the run diverged, use another checkpoint"
            )
        by_module[module] = p
    params = {m: by_module[m] for m in base.module_ranks if m in by_module}  # base order
    return Expert(
        name=name,
        params=params,
        base_model=base.model_id,
        fingerprint=base.fingerprint,
        max_mult=max_mult,
        task=task,
        training={
            "imported_from": {
                "format": OFFICIAL_FORMAT,
                "file": path.name,
                "modules": len(params),
                "base_modules": len(base.module_ranks),
                "subset": len(params) < len(base.module_ranks),
            }
        },
    )
