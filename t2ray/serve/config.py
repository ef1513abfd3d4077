"""The serving config: the ``args`` of a Ray Serve application whose ``import_path`` is
``t2ray.serve.app:build_app``, validated with pydantic (unknown keys are named).

One YAML is read by both ``t2ray serve CONFIG`` and Ray's own ``serve run CONFIG`` / ``serve deploy CONFIG``:
a Serve config file (``applications: [{name, route_prefix, import_path, args}]``, optional ``http_options``).
Relative expert/mixture paths resolve against the current directory (where you run the command).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from t2ray.config import RoutingConfig

IMPORT_PATH = "t2ray.serve.app:build_app"
RESERVED_IDS = ("auto", "base")
NAME_PATTERN = r"^[A-Za-z0-9_.:-]+$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown key is an error that names the key


class ModelSection(Strict):
    spec: str = Field("smollm2-135m", description="smollm2-135m | tiny-llama | folder | hub id")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 where computed natively
    device: str = Field(
        "cpu", description="cpu | cuda (give the replicas num_gpus too; num_gpus > 1 splits the model over them)"
    )
    seed: int = Field(0, description="tiny-llama only: which random weights")
    allow_transfer: bool = Field(False, description="accept experts of another base model with equal shapes")


class MixtureSection(Strict):
    """A named mixture: a mixture JSON file (t2ray's format) or weights over the configured experts."""

    file: str | None = Field(None, description="mixture JSON written by t2ray (e.g. `t2ray adapt --mixture-out`)")
    weights: dict[str, float] | None = Field(None, description="expert name -> α (no sum-to-one, as the paper)")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.file is None) == (self.weights is None):
            raise ValueError("give exactly one of 'file' or 'weights'")
        if self.weights is not None:
            if not self.weights:
                raise ValueError("weights is empty")
            for name, w in self.weights.items():
                if not math.isfinite(w) or w < 0:
                    raise ValueError(f"weight of {name} must be a finite number >= 0, got {w}")
            if not any(w > 0 for w in self.weights.values()):
                raise ValueError("all weights are zero")
        return self


class AutoSection(Strict):
    """What `model: "auto"` does (pass 1)."""

    strategy: Literal["prompt", "classifier", "nearest", "token", "expert", "mixture", "base"] = Field(
        "prompt",
        description="prompt: the base model classifies the query (SPEC §1); classifier: the cls expert "
        "does; nearest: the expert whose training questions' mean sentence embedding is closest; token: per-token "
        "routing; expert/mixture/base: fixed",
    )
    expert: str | None = Field(None, description="strategy expert: which one")
    mixture: str | None = Field(None, description="strategy mixture: which one")
    classify_mode: Literal["score", "generate"] = Field("score", description="score = one forward pass, no decoding")
    categories: dict[str, str] = Field(
        default_factory=dict,
        description="category -> expert name; default: from each expert's task (other -> the base model)",
    )
    routing: RoutingConfig = Field(RoutingConfig(), description="strategy token: the router (SPEC §1)")


class GenerationSection(Strict):
    max_tokens_default: int = Field(128, ge=1, description="when the request gives no max_tokens")
    max_tokens_limit: int = Field(1024, ge=1, description="a larger max_tokens is a 400")
    temperature: float = Field(1.0, ge=0, le=2, description="OpenAI's default; 0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    max_prompts: int = Field(16, ge=1, description="/v1/completions: most prompts in one request")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="a larger request body is a 413")
    request_timeout_s: float = Field(300.0, gt=0, description="a non-streaming request not answered by then is a 504")

    @model_validator(mode="after")
    def _default_within_limit(self):
        if self.max_tokens_default > self.max_tokens_limit:
            raise ValueError(
                f"max_tokens_default ({self.max_tokens_default}) exceeds max_tokens_limit ({self.max_tokens_limit})"
            )
        return self


class BatchingSection(Strict):
    max_batch_size: int = Field(
        16,
        ge=1,
        description="rows decoding together (mixtures may differ per row); a request "
        "joins the running batch at its next step",
    )
    prefill_tokens_per_step: int = Field(
        2048,
        ge=1,
        description="prompt tokens prefilled before one decode step (the "
        "rest join at later steps, so running rows are not stalled)",
    )
    batch_wait_timeout_s: float = Field(0.02, ge=0, description="how long a token-routed batch waits to fill")
    classify_batch_size: int = Field(32, ge=1, description="pass-1 questions per forward pass")
    mode: Literal["auto", "factored", "materialized"] = Field(
        "auto", description="auto: factored (z per row) for mixed batches, materialised W' for hot single mixtures"
    )
    materialize_after: int = Field(4, ge=1, description="requests for one mixture before its W' is built")
    lru_size: int = Field(2, ge=0, description="materialised W' kept (one copy of the adapted weights each)")
    lru_bytes: int | None = Field(
        None,
        ge=1,
        description="and at most this many bytes of them (None: lru_size "
        "alone); a W' larger than this is used but not kept",
    )
    prefix_cache_bytes: int = Field(
        256 << 20,
        ge=0,
        description="keys and values of prompts' leading 16-token blocks kept per adapter state, so that prompts "
        "sharing a start (a chat template's system prompt) prefill only the rest; 0 turns it off (single-device "
        "Llama-family models; others prefill every prompt whole)",
    )
    torch_threads: int | None = Field(None, ge=1, description="torch threads per replica (None = the CPUs it got)")


class ReplicaSection(Strict):
    """Ray Serve options of a deployment (Serve's own `deployments:` overrides in the YAML still apply)."""

    num_replicas: int | Literal["auto"] | None = Field(
        None, description="fixed count, 'auto', or None with autoscaling_config"
    )
    autoscaling_config: dict[str, Any] | None = Field(None, description="Serve's AutoscalingConfig fields")
    ray_actor_options: dict[str, Any] = Field(default_factory=dict, description="num_cpus, num_gpus, memory, ...")
    max_ongoing_requests: int | None = Field(None, ge=1)
    max_queued_requests: int | None = Field(
        None,
        ge=1,
        description="requests waiting for this deployment beyond "
        "which callers get a 503 at once (Serve's backpressure)",
    )
    health_check_period_s: float | None = Field(None, gt=0)
    health_check_timeout_s: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _replicas_xor_autoscaling(self):
        if isinstance(self.num_replicas, int) and self.num_replicas < 1:
            raise ValueError("num_replicas must be >= 1")
        if isinstance(self.num_replicas, int) and self.autoscaling_config:
            raise ValueError("give num_replicas or autoscaling_config, not both")
        return self

    def options(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True, exclude_defaults=False)


class ServeArgs(Strict):
    """The `args` of the t2ray Serve application."""

    model: ModelSection = ModelSection()
    experts: dict[str, str] = Field(
        default_factory=dict,
        description="model id -> expert .safetensors, or LoRA "
        "adapter folders (all experts of one server are of one kind)",
    )
    mixtures: dict[str, MixtureSection] = Field(default_factory=dict, description="model id -> mixture")
    classifier_expert: str | None = Field(None, description="cls expert for the classifier strategy")
    auto: AutoSection = AutoSection()
    generation: GenerationSection = GenerationSection()
    batching: BatchingSection = BatchingSection()
    expert_model: ReplicaSection = ReplicaSection(
        num_replicas=1,
        max_ongoing_requests=64,
        max_queued_requests=256,
        health_check_period_s=5,
        health_check_timeout_s=30,
    )
    dispatcher: ReplicaSection = ReplicaSection(
        num_replicas=1, max_ongoing_requests=512, ray_actor_options={"num_cpus": 0}
    )
    api_key_env: str | None = Field(
        "T2RAY_API_KEY",
        description="when this env var is set (in the cluster), requests need `Authorization: Bearer <its value>`",
    )
    require_api_key: bool | None = Field(
        None,
        description="the Dispatcher refuses to start without the key; None: "
        "required when api_key_env is set where the application is built",
    )
    retries: int = Field(2, ge=0, description="a request whose replica died is re-sent this many times")

    @field_validator("experts", "mixtures")
    @classmethod
    def _names(cls, value: dict):
        import re

        for name in value:
            if name in RESERVED_IDS or not re.match(NAME_PATTERN, name):
                raise ValueError(f"model id {name!r} is reserved or has characters outside [A-Za-z0-9_.:-]")
        return value

    @model_validator(mode="after")
    def _references(self):
        clash = set(self.experts) & set(self.mixtures)
        if clash:
            raise ValueError(f"{sorted(clash)[0]!r} is both an expert and a mixture name")
        for name, mix in self.mixtures.items():
            for expert in mix.weights or {}:
                if expert not in self.experts:
                    raise ValueError(
                        f"mixture {name!r} uses unknown expert {expert!r}; experts: {sorted(self.experts)}"
                    )
        a = self.auto
        needs = {"expert": (a.expert, self.experts), "mixture": (a.mixture, self.mixtures)}
        if a.strategy in needs:
            chosen, known = needs[a.strategy]
            if chosen not in known:
                raise ValueError(f"auto.strategy {a.strategy} needs auto.{a.strategy} set to one of {sorted(known)}")
        if a.strategy == "classifier" and not self.classifier_expert:
            raise ValueError("auto.strategy classifier needs classifier_expert (an expert trained on the cls task)")
        if a.strategy in ("prompt", "classifier", "nearest", "token") and not self.experts:
            raise ValueError(f"auto.strategy {a.strategy} needs experts to choose from")
        for category, expert in a.categories.items():
            if expert not in self.experts:
                raise ValueError(f"auto.categories.{category}: unknown expert {expert!r}")
        inflight = self.expert_model.max_ongoing_requests
        if inflight is not None and inflight < 2 * self.batching.max_batch_size:
            raise ValueError(
                f"expert_model.max_ongoing_requests ({inflight}) < 2 × batching.max_batch_size "
                f"({self.batching.max_batch_size}): a full batch and as many requests waiting to join it"
            )
        return self

    @model_validator(mode="after")
    def _replica_gpus(self):
        """A replica asking several GPUs gets the model split over them (whole GPUs, and CUDA, to split it on)."""
        gpus, key = self.expert_model.ray_actor_options.get("num_gpus"), "expert_model.ray_actor_options.num_gpus"
        if gpus is None:
            return self
        if isinstance(gpus, bool) or not isinstance(gpus, int | float) or not math.isfinite(gpus) or gpus < 0:
            raise ValueError(f"{key} must be a number >= 0, got {gpus!r}")
        if gpus > 1 and gpus != int(gpus):
            raise ValueError(
                f"{key} = {gpus:g}: a replica that spans GPUs takes whole ones (a fraction up to 1 shares one GPU)"
            )
        if gpus > 1 and self.model.device != "cuda":
            raise ValueError(
                f"{key} = {gpus:g} splits the model over {int(gpus)} GPUs: that needs model.device: cuda, "
                f"not {self.model.device}"
            )
        return self

    @property
    def replica_gpus(self) -> int:
        """GPUs one model replica spans (1: the whole model on one device, a GPU or the CPU)."""
        return max(1, int(self.expert_model.ray_actor_options.get("num_gpus") or 0))

    def resolved(self, root: Path | None = None) -> ServeArgs:
        """A copy with every file path absolute (relative ones against `root`, default the current directory),
        checked to exist, so replicas started anywhere in the cluster find them."""
        root = Path(root or Path.cwd())

        def absolute(path: str, what: str, folder_ok: bool = True) -> str:
            p = Path(path).expanduser()
            p = p if p.is_absolute() else root / p
            if not (p.is_file() or (folder_ok and p.is_dir())):
                raise FileNotFoundError(
                    f"{what} {path!r} not found (looked at {p}); train it first "
                    "(e.g. `t2ray quickstart` / `t2ray train`) or fix the path"
                )
            return str(p.resolve())

        data = self.model_dump()
        data["experts"] = {n: absolute(p, f"expert {n!r}:") for n, p in self.experts.items()}
        for name, mix in data["mixtures"].items():
            if mix["file"]:
                mix["file"] = absolute(mix["file"], f"mixture {name!r}: file", folder_ok=False)
        if self.classifier_expert:
            data["classifier_expert"] = absolute(self.classifier_expert, "classifier_expert")
        return ServeArgs.model_validate(data)


def read_serve_config(path: str | Path) -> dict:
    """A Serve config file as a dict, validated by Ray's own schema (ServeDeploySchema)."""
    from ray.serve.schema import ServeDeploySchema

    from t2ray.config import read_yaml

    data = read_yaml(path)
    if "applications" not in data:
        raise ValueError(
            f"{path}: not a Serve config file (no 'applications' list); see experiments/serve-smollm2.yaml"
        )
    ServeDeploySchema.model_validate(data)
    return data


def t2ray_applications(config: dict) -> list[dict]:
    """The applications of a Serve config that run t2ray's builder."""
    apps = [a for a in config.get("applications", []) if a.get("import_path") == IMPORT_PATH]
    if not apps:
        raise ValueError(f"no application with import_path {IMPORT_PATH} in the Serve config")
    return apps
