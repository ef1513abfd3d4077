"""The command line end to end (in-process typer runner, real models/tasks), and its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from t2ray.cli import app
from t2ray.experts import Expert, save_expert
from t2ray.models import load_model
from t2ray.svf import base_model_info, patch_model, trainable_params

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(map(str, args)))


@pytest.fixture(scope="module")
def tiny_expert(tmp_path_factory):
    """A real SVF expert file for tiny-llama (seed 0), with z moved away from the init."""
    model, _ = load_model("tiny-llama")
    patch_model(model, progress=False)
    info = base_model_info(model)
    params = {k: v + torch.randn_like(v) for k, v in trainable_params(model).items()}
    path = tmp_path_factory.mktemp("experts") / "tiny.safetensors"
    save_expert(Expert(name="tiny", params=params, base_model=info.model_id, fingerprint=info.fingerprint), path)
    return path, params, info


def test_decompose_reports_the_matrices():
    result = invoke("decompose", "--model", "tiny-llama", "--modules", "all")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{") :])
    assert summary["matrices"] == 14 and summary["z_values"] > 0


def test_eval_base_and_expert_write_json(tmp_path, tiny_expert):
    out = tmp_path / "base.json"
    result = invoke("eval", "--model", "tiny-llama", "--task", "math", "--limit", "3", "--out", out)
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["n"] == 3 and 0.0 <= saved["accuracy"] <= 1.0 and len(saved["records"]) == 3
    result = invoke("eval", "--model", "tiny-llama", "--task", "math", "--limit", "2", "--expert", tiny_expert[0])
    assert result.exit_code == 0, result.output
    assert '"adapter": "expert:tiny"' in result.output


def test_one_hot_mix_equals_the_expert_alone(tiny_expert, tmp_path):
    from t2ray.library import load_adapted

    other = tmp_path / "other.safetensors"
    path, params, info = tiny_expert
    save_expert(
        Expert(
            name="other",
            params={k: -v for k, v in params.items()},
            base_model=info.model_id,
            fingerprint=info.fingerprint,
        ),
        other,
    )
    ids = torch.tensor([[1, 2, 3, 4]])
    alone, _, _ = load_adapted("tiny-llama", expert=path)
    mixed, _, _ = load_adapted("tiny-llama", mix=f"{path}:1,{other}:0")
    with torch.no_grad():
        assert torch.equal(alone(ids).logits, mixed(ids).logits)


def test_experts_show_prints_metadata(tiny_expert):
    result = invoke("experts", "show", tiny_expert[0])
    assert result.exit_code == 0
    meta = json.loads(result.output)
    assert meta["name"] == "tiny" and meta["base_model"]["fingerprint"] == tiny_expert[2].fingerprint


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "--model", "no-such-model", "--task", "math"], "unknown model spec"),
        (["eval", "--model", "tiny-llama", "--task", "no-such-task"], "unknown task"),
        (["eval", "--model", "tiny-llama", "--task", "math", "--mix", "a.safetensors:nan"], "error:"),
        (["decompose", "--model", "tiny-llama", "--modules", "nonexistent_proj"], "no linear layer matches"),
        (["decompose", "--model", "tiny-llama", "--layers", "0-9"], "out of range"),
    ],
)
def test_user_errors_are_one_line(args, message):
    result = invoke(*args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_expert_of_another_model_is_refused_then_allowed_with_transfer(tiny_expert, tmp_path):
    other, tokenizer = load_model("tiny-llama", seed=1)  # a re-initialised copy: equal shapes, other weights
    other.save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    args = ["eval", "--model", tmp_path / "other", "--task", "math", "--limit", "1", "--expert", tiny_expert[0]]
    refused = invoke(*args)
    assert refused.exit_code == 2 and "--allow-transfer" in refused.output
    allowed = invoke(*args, "--allow-transfer")
    assert allowed.exit_code == 0, allowed.output


def test_plan_fits_and_does_not_fit():
    fits = invoke("plan", "--model", "llama3-8b", "--gpus", "1", "--gpu-mem-gb", "80", "--zero", "2")
    assert fits.exit_code == 0 and "393,216 z values" in fits.output and "fits" in fits.output
    big = invoke("plan", "--model", "llama3-70b", "--gpus", "16", "--gpu-mem-gb", "80", "--zero", "3")
    assert big.exit_code == 0
    no = invoke("plan", "--model", "llama3-70b", "--gpus", "2", "--gpu-mem-gb", "80", "--zero", "2")
    assert no.exit_code == 1 and "does NOT fit" in no.output


def test_plan_serve_of_a_serve_config(tmp_path):
    """`t2ray plan --serve CONFIG`: one replica per GPU; exit 1 when it does not fit, 2 for an invalid config."""
    shipped = Path(__file__).resolve().parents[1] / "experiments" / "serve-llama3-70b.yaml"
    fits = invoke("plan", "--serve", shipped, "--gpu-mem-gb", "80")
    assert fits.exit_code == 0 and "one replica on 4×80 GB (GPU 1 of 4, layers 19-39)" in fits.output, fits.output
    one_gpu = tmp_path / "one.yaml"
    one_gpu.write_text(shipped.read_text().replace("num_gpus: 4}", "num_gpus: 1}"))
    no = invoke("plan", "--serve", one_gpu, "--gpu-mem-gb", "80")
    assert no.exit_code == 1 and "does NOT fit" in no.output
    on_cpu = tmp_path / "cpu.yaml"
    on_cpu.write_text(shipped.read_text().replace("device: cuda", "device: cpu"))
    refused = invoke("plan", "--serve", on_cpu)
    assert refused.exit_code == 2 and "expert_model.ray_actor_options.num_gpus = 4" in refused.output


def test_plan_takes_either_yaml_as_its_argument():
    """`t2ray plan FILE.yaml` (as `t2ray train` and `t2ray serve` take theirs): a Serve config plans as --serve,
    anything else as --experiment; the same YAML given twice is refused."""
    shipped = Path(__file__).resolve().parents[1] / "experiments"
    for name, flag in (("llama3-70b-svf.yaml", "--experiment"), ("serve-llama3-70b.yaml", "--serve")):
        positional, flagged = invoke("plan", shipped / name), invoke("plan", flag, shipped / name)
        assert positional.exit_code == 0 and positional.output == flagged.output, positional.output
    twice = invoke("plan", shipped / "llama3-70b-svf.yaml", "--experiment", shipped / "llama3-70b-svf.yaml")
    assert twice.exit_code == 2 and "give the YAML once" in twice.output


def test_plan_reads_the_users_model_from_a_folder_a_config_or_the_hub_cache(tmp_path):
    from t2ray.models.loader import resolve

    folder = resolve("smollm2-135m")  # the embedded model: a folder with its config.json
    by_folder = invoke("plan", "--model", str(folder), "--gpus", "1", "--gpu-mem-gb", "24")
    by_file = invoke("plan", "--model", str(Path(folder) / "config.json"), "--gpus", "1", "--gpu-mem-gb", "24")
    assert by_folder.exit_code == 0 and "51,840 z values" in by_folder.output  # 30 layers × 3 MLP × 576
    assert by_file.output.replace(str(Path(folder) / "config.json"), str(folder)) == by_folder.output
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": "bert"}')
    refused = invoke("plan", "--model", str(bad))
    assert refused.exit_code == 2 and "missing num_hidden_layers" in refused.output
    offline = invoke("plan", "--model", "no-such-org/no-such-model")
    assert offline.exit_code == 2 and "neither in the hub cache nor reachable" in offline.output


def test_tasks_lists_builtins():
    result = invoke("tasks")
    assert result.exit_code == 0
    assert {"math", "code", "reasoning", "humaneval", "cls"} <= set(json.loads(result.output))


def test_adapt_reads_a_yaml_and_the_command_line_overrides_it(tiny_expert, tmp_path):
    config = tmp_path / "adapt.yaml"
    config.write_text(
        f"strategy: fewshot\ntask: math\nmodel: {{spec: tiny-llama}}\nexperts: [{tiny_expert[0]}]\n"
        "limit: 4\ncem: {population: 2, generations: 3, shots: 2}\n"
    )
    result = invoke("adapt", "--config", config, "--limit", "1", "--generations", "1")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{") :])
    assert summary["n"] == 1 and summary["strategy"] == "fewshot" and len(summary["alpha"]) == 1


def test_adapt_without_a_strategy_names_the_missing_key():
    result = invoke("adapt", "--task", "math", "--expert", "x.safetensors")
    assert result.exit_code == 2 and "strategy: Field required" in result.output


def test_eval_takes_a_lora_expert_folder(tmp_path):
    from t2ray.config import LoRAConfig
    from t2ray.lora import LoRAAdapter
    from t2ray.svf import SVFConfig

    model, _ = load_model("tiny-llama")
    adapter = LoRAAdapter(model, LoRAConfig(r=2, alpha=4), SVFConfig(target_modules="mlp"))
    folder = adapter.save(tmp_path / "expert", adapter.state(), name="math-lora", task="math", training={}, metrics={})
    result = invoke("eval", "--model", "tiny-llama", "--task", "math", "--limit", "2", "--expert", folder)
    assert result.exit_code == 0, result.output
    assert '"adapter": "lora:math-lora"' in result.output  # the expert's name, not its folder's (always expert/)
