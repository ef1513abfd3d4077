"""Experiment configs (t2ray.config): defaults, YAML, --set overrides, clear errors, and the shipped experiments."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from t2ray.config import DeepSpeedConfig, ExperimentConfig, deep_merge, load_experiment, parse_overrides, read_yaml

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
# Top-level keys that mark a YAML under experiments/ as another kind of config (serving, sweeps, adaptation).
NOT_EXPERIMENT_KEYS = {
    "applications",
    "deployments",
    "serve",
    "sweep",
    "search_space",
    "param_space",
    "tune",
    "strategy",
    "experts",
}


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---------------------------------------------------------------- defaults


def test_defaults_are_the_papers():
    cfg = ExperimentConfig()
    assert cfg.method == "svf" and cfg.task == "math" and cfg.seed == 0
    assert cfg.model.spec == "smollm2-135m" and cfg.model.dtype == "auto"
    rl = cfg.rl
    assert (rl.objective, rl.lr, rl.grad_clip, rl.kl_coef, rl.baseline) == ("reinforce", 2e-3, 1e-3, 0.0, "none")
    assert rl.eval_interval == 10 and rl.samples_per_prompt == 1 and rl.temperature == 1.0
    assert rl.normalize_rewards is False and rl.reward_clip is None
    assert cfg.svf.max_mult == 1.0 and cfg.svf.init_mean == 0.1 and cfg.svf.init_std == 0.01
    assert cfg.svf.target_modules == "mlp"
    assert cfg.deepspeed.enabled and cfg.deepspeed.zero_stage == 2
    assert cfg.scaling.num_workers == 2 and not cfg.scaling.use_gpu
    assert cfg.max_failures >= 1 and cfg.checkpoint_keep >= 1
    assert cfg.run_dir == (Path("runs").resolve() / "experiment")


def test_load_experiment_without_a_file_is_the_defaults():
    assert load_experiment() == ExperimentConfig()
    assert load_experiment(None, []) == ExperimentConfig()


# ---------------------------------------------------------------- YAML


def test_yaml_overrides_only_what_it_names(tmp_path):
    path = write(
        tmp_path / "exp.yaml",
        """
name: my-run
task: code
method: lora
model: {spec: tiny-llama}
lora: {r: 4}
rl:
  iterations: 7
  batch_size: 4
  lr: 1.0e-2
  baseline: group
  samples_per_prompt: 2
deepspeed: {zero_stage: 3, param_persistence_threshold: 1000}
scaling: {num_workers: 2, cpus_per_worker: 0.5}
storage_path: %s
"""
        % (tmp_path / "runs"),
    )
    cfg = load_experiment(path)
    assert (cfg.name, cfg.task, cfg.method, cfg.model.spec) == ("my-run", "code", "lora", "tiny-llama")
    assert cfg.lora.r == 4 and cfg.lora.alpha == 32  # sibling default kept
    assert (cfg.rl.iterations, cfg.rl.batch_size, cfg.rl.lr, cfg.rl.baseline, cfg.rl.samples_per_prompt) == (
        7,
        4,
        1e-2,
        "group",
        2,
    )
    assert cfg.rl.grad_clip == 1e-3  # untouched default
    assert cfg.deepspeed.zero_stage == 3 and cfg.deepspeed.param_persistence_threshold == 1000
    assert cfg.scaling.cpus_per_worker == 0.5
    assert cfg.run_dir == tmp_path / "runs" / "my-run"


def test_empty_yaml_is_the_defaults(tmp_path):
    assert load_experiment(write(tmp_path / "empty.yaml", "")) == ExperimentConfig()
    assert load_experiment(write(tmp_path / "comments.yaml", "# nothing here\n")) == ExperimentConfig()


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml: no such file"):
        load_experiment(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "text, line, column",
    [
        ("name: a\nrl:\n  lr: [1, 2\n  iterations: 3\n", 4, 13),  # unclosed flow sequence
        ("name: a\nrl:\n  lr: 1\n bad_indent: 2\n", 4, 2),  # mapping indentation
        ("name: 'unterminated\n", 2, 1),  # unterminated quote
    ],
)
def test_malformed_yaml_names_line_and_column(tmp_path, text, line, column):
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ValueError) as err:
        load_experiment(path)
    message = str(err.value)
    assert str(path) in message and "malformed YAML" in message
    assert f"line {line}" in message, message
    assert "column" in message
    assert "\n" not in message  # one line
    # the reported position is PyYAML's own problem mark
    try:
        yaml.safe_load(text)
    except yaml.YAMLError as yerr:
        assert f"line {yerr.problem_mark.line + 1}, column {yerr.problem_mark.column + 1}" in message


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(ValueError, match="expected a mapping at the top level, got list"):
        read_yaml(write(tmp_path / "list.yaml", "- a\n- b\n"))


# ---------------------------------------------------------------- unknown keys, bad values


@pytest.mark.parametrize(
    "text, key",
    [
        ("nmae: x\n", "nmae"),
        ("rl: {lrr: 0.1}\n", "rl.lrr"),
        ("deepspeed: {zero_stage: 2, offload: true}\n", "deepspeed.offload"),
        ("svf: {target: mlp}\n", "svf.target"),
        ("scaling: {num_workers: 2, gpus: 1}\n", "scaling.gpus"),
    ],
)
def test_unknown_key_is_an_error_naming_the_key(tmp_path, text, key):
    with pytest.raises(ValidationError) as err:
        load_experiment(write(tmp_path / "exp.yaml", text))
    message = str(err.value)
    assert key in message and "Extra inputs are not permitted" in message


def test_unknown_key_through_set_names_the_key():
    with pytest.raises(ValidationError, match=r"rl\.learning_rate"):
        load_experiment(overrides=["rl.learning_rate=0.1"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("rl.lr=0", "rl.lr"),
        ("rl.lr=fast", "rl.lr"),
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
        ("method=adapter", "method"),
        ("rl.baseline=median", "rl.baseline"),
        ("name=has space", "name"),
        ("scaling.num_workers=0", "scaling.num_workers"),
        ("scaling.placement_strategy=ANYWHERE", "scaling.placement_strategy"),
        ("scaling.resources={CPU: 2}", "scaling.resources"),
        ("scaling.resources={trainer: 0}", "scaling.resources"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ValidationError) as err:
        load_experiment(overrides=[override])
    assert key in str(err.value)


def test_custom_resources_join_the_cpus_of_each_worker():
    cfg = load_experiment(overrides=["scaling.resources={trainer: 1}", "scaling.placement_strategy=STRICT_SPREAD"])
    assert cfg.scaling.per_worker() == {"CPU": 1, "trainer": 1}


def test_batch_smaller_than_workers_is_refused():
    with pytest.raises(ValidationError, match=r"rl.batch_size \(2\) must be ≥ scaling.num_workers \(4\)"):
        load_experiment(overrides=["rl.batch_size=2", "scaling.num_workers=4"])
    cfg = load_experiment(overrides=["rl.batch_size=4", "scaling.num_workers=4"])  # equal is fine
    assert cfg.rl.batch_size == cfg.scaling.num_workers == 4
    # DeepSpeed asserts train_batch = micro-batch × workers inside every worker, after the model loaded (and Ray
    # Train retried it max_failures times): refused here, in one line
    with pytest.raises(ValidationError, match=r"rl.batch_size \(5\) must be a multiple of scaling.num_workers \(2\)"):
        load_experiment(overrides=["rl.batch_size=5", "scaling.num_workers=2"])
    assert load_experiment(overrides=["rl.batch_size=5", "scaling.num_workers=2", "deepspeed.enabled=false"])


# ---------------------------------------------------------------- --set overrides


def test_parse_overrides_nested_and_typed():
    assert parse_overrides(
        [
            "rl.lr=1.0e-3",
            "scaling.num_workers=1",
            "name=run-2",
            "deepspeed.enabled=false",
            "rl.reward_clip=null",
            "svf.layers=[0, 1]",
            "rl.max_new_tokens=8",
        ]
    ) == {
        "rl": {"lr": 1e-3, "reward_clip": None, "max_new_tokens": 8},
        "scaling": {"num_workers": 1},
        "name": "run-2",
        "deepspeed": {"enabled": False},
        "svf": {"layers": [0, 1]},
    }
    assert parse_overrides(["task=a=b"]) == {"task": "a=b"}  # only the first '=' splits
    # YAML 1.1 reads "1e-3" (no dot) as a string; the typed config still gets the float
    assert load_experiment(overrides=["rl.lr=1e-3"]).rl.lr == 1e-3
    assert parse_overrides([]) == {}


@pytest.mark.parametrize("bad", ["rl.lr", "=3", ""])
def test_parse_overrides_refuses_non_pairs(bad):
    with pytest.raises(ValueError, match="is not key=value"):
        parse_overrides([bad])


def test_set_overrides_win_over_the_yaml(tmp_path):
    path = write(
        tmp_path / "exp.yaml",
        "name: base\nrl: {lr: 1.0e-2, iterations: 5, batch_size: 8}\ndeepspeed: {zero_stage: 3}\n",
    )
    cfg = load_experiment(
        path,
        [
            "rl.lr=0.5",
            "deepspeed.zero_stage=2",
            "scaling.num_workers=1",
            "model.spec=tiny-llama",
            "svf.target_modules=all",
            "rl.temperature=0",
        ],
    )
    assert cfg.name == "base"
    assert cfg.rl.lr == 0.5 and isinstance(cfg.rl.lr, float)
    assert cfg.rl.iterations == 5 and cfg.rl.batch_size == 8  # YAML siblings of an override kept
    assert cfg.deepspeed.zero_stage == 2 and isinstance(cfg.deepspeed.zero_stage, int)
    assert cfg.scaling.num_workers == 1 and cfg.model.spec == "tiny-llama" and cfg.svf.target_modules == "all"
    assert cfg.rl.temperature == 0.0
    # a later --set of the same key wins
    assert load_experiment(path, ["rl.lr=0.1", "rl.lr=0.2"]).rl.lr == 0.2


def test_deep_merge_does_not_mutate():
    base = {"rl": {"lr": 1, "iterations": 2}, "name": "a"}
    merged = deep_merge(base, {"rl": {"lr": 3}, "seed": 1})
    assert merged == {"rl": {"lr": 3, "iterations": 2}, "name": "a", "seed": 1}
    assert base == {"rl": {"lr": 1, "iterations": 2}, "name": "a"}
    assert deep_merge({"svf": "mlp"}, {"svf": {"layers": [0]}}) == {"svf": {"layers": [0]}}  # dict replaces scalar


# ---------------------------------------------------------------- DeepSpeed dict


def test_deepspeed_to_dict():
    ds = DeepSpeedConfig(zero_stage=2).to_dict(train_batch=8, world_size=2, grad_clip=1e-3, lr=2e-3)
    assert ds["train_batch_size"] == 8 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 1 and ds["gradient_clipping"] == 1e-3
    assert ds["optimizer"]["params"]["lr"] == 2e-3
    assert ds["optimizer"]["params"].get("torch_adam") is True  # no fused-Adam compile on CPU (SPEC §4)
    assert ds["zero_optimization"]["stage"] == 2
    assert "stage3_param_persistence_threshold" not in ds["zero_optimization"]
    assert "offload_optimizer" not in ds["zero_optimization"]

    ds3 = DeepSpeedConfig(zero_stage=3, param_persistence_threshold=1000, offload_optimizer=True).to_dict(
        8, 2, 1e-3, 2e-3
    )
    assert ds3["zero_optimization"]["stage"] == 3
    assert ds3["zero_optimization"]["stage3_param_persistence_threshold"] == 1000
    assert ds3["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert DeepSpeedConfig(zero_stage=0).to_dict(3, 4, 1.0, 1.0)["train_micro_batch_size_per_gpu"] == 1


def test_zero3_builds_the_weights_in_their_compute_dtype():
    """zero.Init partitions the weights in the dtype the DeepSpeed config names (fp32 without a section: 282 GB for
    70B instead of 141); ZeRO-2 keeps the model as loaded (a bf16 section there would cast z to bf16 too)."""
    zero3 = DeepSpeedConfig(zero_stage=3).to_dict(4, 2, 1.0, 1e-3, "bfloat16")
    assert zero3["bf16"] == {"enabled": True} and "fp16" not in zero3
    assert DeepSpeedConfig(zero_stage=3).to_dict(4, 2, 1.0, 1e-3, "float16")["fp16"] == {"enabled": True}
    assert not {"bf16", "fp16"} & set(DeepSpeedConfig(zero_stage=3).to_dict(4, 2, 1.0, 1e-3, "float32"))
    assert not {"bf16", "fp16"} & set(DeepSpeedConfig(zero_stage=2).to_dict(4, 2, 1.0, 1e-3, "bfloat16"))


def test_zero3_threshold_is_raised_so_trained_tensors_stay_whole():
    """A threshold below the largest z (or LoRA matrix) partitioned it: each rank then checkpointed an empty shard."""
    from t2ray.train.worker import keep_trainable_whole

    low = DeepSpeedConfig(zero_stage=3, param_persistence_threshold=1000).to_dict(4, 2, 1.0, 1e-3)
    assert keep_trainable_whole(low, 1536) == 1537
    assert low["zero_optimization"]["stage3_param_persistence_threshold"] == 1537
    high = DeepSpeedConfig(zero_stage=3).to_dict(4, 2, 1.0, 1e-3)  # 16384 by default: nothing to do
    assert (
        keep_trainable_whole(high, 1536) is None
        and high["zero_optimization"]["stage3_param_persistence_threshold"] == 16384
    )


# ---------------------------------------------------------------- the shipped experiments


def experiment_files() -> list[Path]:
    files = []
    for path in sorted(EXPERIMENTS.rglob("*.y*ml")):
        rel = path.relative_to(EXPERIMENTS)
        if any(part in ("sweeps", "serve", "serving") for part in rel.parts[:-1]):
            continue
        if any(word in path.stem for word in ("serve", "sweep", "quickstart")):  # other config kinds
            continue
        data = yaml.safe_load(path.read_text()) or {}
        if isinstance(data, dict) and NOT_EXPERIMENT_KEYS & set(data):
            continue
        files.append(path)
    return files


def test_there_are_shipped_experiments():
    names = [p.name for p in experiment_files()]
    assert "smollm2-math.yaml" in names, names


@pytest.mark.parametrize("path", experiment_files(), ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_shipped_experiment_validates(path):
    cfg = load_experiment(path)
    assert cfg.name and cfg.rl.batch_size >= cfg.scaling.num_workers
    # and stays valid under a typical CLI override
    assert load_experiment(path, ["rl.iterations=1"]).rl.iterations == 1


def test_with_absolute_paths_resolves_local_files_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-model").mkdir()
    (tmp_path / "task.yaml").write_text("name: t\n")
    local = ExperimentConfig(storage_path="runs", task="task.yaml", model={"spec": "my-model"}).with_absolute_paths()
    assert local.storage_path == str(tmp_path / "runs")
    assert local.task == str(tmp_path / "task.yaml")
    assert local.model.spec == str(tmp_path / "my-model")
    named = ExperimentConfig(task="math", model={"spec": "HuggingFaceTB/SmolLM2-135M-Instruct"}).with_absolute_paths()
    assert (named.task, named.model.spec) == ("math", "HuggingFaceTB/SmolLM2-135M-Instruct")


@pytest.mark.parametrize("baseline", ["group", "rloo"])
def test_group_baselines_need_several_samples_per_prompt(baseline):
    with pytest.raises(ValueError, match=f"rl.baseline {baseline} .*samples_per_prompt ≥ 2"):
        ExperimentConfig.model_validate({"rl": {"baseline": baseline}})
    assert ExperimentConfig.model_validate({"rl": {"baseline": baseline, "samples_per_prompt": 4}}).rl.batch_size == 16


def test_a_gpu_run_gets_deepspeeds_cuda_accelerator_whatever_the_shell_exported(monkeypatch):
    from t2ray.train.worker import select_accelerator

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # the Makefile exports it for the tests; Ray forwarded it
    assert select_accelerator(use_gpu=True) == "cuda" and os.environ["DS_ACCELERATOR"] == "cuda"
    assert select_accelerator(use_gpu=False) == "cpu"
