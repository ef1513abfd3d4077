"""Each two-pass strategy end to end on tiny-llama with tiny experts (real Ray actors for CEM), and the
score-mode classifier against generate mode on SmolLM2."""

from __future__ import annotations

import json
import math
import random

import pytest
import ray
import torch

from t2ray.adapt.dispatch import classify
from t2ray.adapt.two_pass import run_adapt, save_found_mixture
from t2ray.config import AdaptConfig
from t2ray.experts import Expert, save_expert
from t2ray.library import load_mixture
from t2ray.models import load_model
from t2ray.svf import base_model_info, patch_model, trainable_params


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """Three tiny SVF experts (math/code/reasoning) and a classifier expert, as files."""
    model, _ = load_model("tiny-llama")
    patch_model(model, progress=False)
    info = base_model_info(model)
    folder = tmp_path_factory.mktemp("library")
    g = torch.Generator().manual_seed(0)
    paths = {}
    for task in ("math", "code", "reasoning", "cls"):
        params = {k: v + torch.randn(v.shape, generator=g) for k, v in trainable_params(model).items()}
        paths[task] = save_expert(
            Expert(
                name=f"tiny-{task}", params=params, base_model=info.model_id, fingerprint=info.fingerprint, task=task
            ),
            folder / f"{task}.safetensors",
        )
    return paths


def config(library, strategy, task="math-hard", **kw):
    return AdaptConfig(
        strategy=strategy,
        task=task,
        model={"spec": "tiny-llama"},
        experts=[str(library[t]) for t in ("math", "code", "reasoning")],
        classifier_expert=str(library["cls"]),
        **{"limit": 3, **kw},
    )


@pytest.mark.parametrize("strategy", ["prompt", "classifier", "token"])  # nearest: the test below
def test_dispatch_strategies_end_to_end(library, strategy):
    result = run_adapt(config(library, strategy), progress=False)
    assert result.eval.n == 3 and len(result.choices) == 3
    assert set(result.choices) <= {"tiny-math", "tiny-code", "tiny-reasoning", "base", "token-routed"}
    assert result.pass1_s > 0 and result.pass2_s > 0


@pytest.mark.parametrize("strategy", ["prompt", "classifier", "token"])  # nearest: the test below
def test_lora_adapters_take_every_dispatch_strategy(lora_library, strategy):
    """`t2ray adapt --expert runs/…/lora-math/expert …`: LoRA folders (Belofsky's setting) instead of SVF files."""
    result = run_adapt(config(lora_library, strategy), progress=False)
    assert result.eval.n == 3 and result.expert_names == ["lora-math", "lora-code", "lora-reasoning"]
    assert set(result.choices) <= {"lora-math", "lora-code", "lora-reasoning", "base", "token-routed"}
    assert all(r["completion"] is not None for r in result.eval.records)


@pytest.mark.parametrize("task, expert", [("math-hard", "math"), ("code-hard", "code")])
def test_nearest_sends_an_unseen_tasks_queries_to_its_categorys_expert(library, lora_library, task, expert):
    """The nearest centroid of the experts' training questions: every query of an unseen math (code) task goes to
    the math (code) expert, with SVF files and with LoRA folders alike."""
    for paths, prefix in ((library, "tiny"), (lora_library, "lora")):
        result = run_adapt(config(paths, "nearest", task=task, limit=8), progress=False)
        assert result.choices == [f"{prefix}-{expert}"] * 8, result.choices


def test_lora_one_hot_rows_answer_as_the_adapter_alone(lora_library, tokenizer):
    """Pass 2 with one adapter per row (and a row on the base model) equals each adapter applied by PEFT."""
    from peft import PeftModel

    from t2ray.adapt.token_routing import LoRAMixer, generate_weighted
    from t2ray.generation import generate

    prompts = [[{"role": "user", "content": f"What is {i} + {i}?"}] for i in range(3)]
    model = load_model("tiny-llama")[0]
    mixer = LoRAMixer(model, [lora_library["math"], lora_library["code"]])
    texts = generate_weighted(
        model, tokenizer, prompts, mixer, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]), max_new_tokens=5
    )
    assert len(set(texts)) == 3, texts  # the adapters change the answers
    for row, folder in enumerate([lora_library["math"], lora_library["code"], None]):
        reference = load_model("tiny-llama")[0]
        if folder is not None:
            reference = PeftModel.from_pretrained(reference, folder)
        assert texts[row] == generate(reference, tokenizer, [prompts[row]], max_new_tokens=5)[0]


def test_svf_files_and_lora_folders_do_not_mix(library, lora_library):
    from t2ray.experts import ExpertError

    mixed = config(library, "token").model_copy(update={"experts": [str(library["math"]), str(lora_library["code"])]})
    with pytest.raises(ExpertError, match="SVF expert files or LoRA adapter folders, not both"):
        run_adapt(mixed, progress=False)
    with pytest.raises(ExpertError, match="one α per adapter"):
        run_adapt(config(lora_library, "fewshot", cem={"per_module": True}), progress=False)


def test_lora_fewshot_finds_one_alpha_per_adapter(lora_library):
    """LoraHub's setting: CEM over the adapters' weights on k shots, then every query answered with that mixture."""
    result = run_adapt(
        config(lora_library, "fewshot", cem={"population": 4, "generations": 2, "shots": 2}), progress=False
    )
    assert len(result.alpha) == 3 and len(result.history) == 2 and result.choices == ["mixture"] * 3
    assert result.eval.n == 3


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_fewshot_on_ray_actors_writes_a_usable_mixture(library, ray_cluster, tmp_path):
    cfg = config(library, "fewshot", cem={"population": 4, "generations": 2, "shots": 2, "actors": 2})
    result = run_adapt(cfg, progress=False)
    assert len(result.alpha) == 3 and all(0 <= a <= 1 for a in result.alpha)
    assert len(result.history) == 2 and result.choices == ["mixture"] * 3
    path = save_found_mixture(result, cfg, tmp_path / "found.json")
    mixture, experts = load_mixture(path)
    assert mixture.alpha == result.alpha and [e.name for e in experts] == ["tiny-math", "tiny-code", "tiny-reasoning"]
    assert json.loads(path.read_text())["task"] == "math-hard"


def test_bad_adapt_settings_are_refused(library):
    with pytest.raises(ValueError, match="population"):
        config(library, "fewshot", cem={"population": 1})
    with pytest.raises(ValueError, match="elite_ratio"):
        config(library, "fewshot", cem={"elite_ratio": 0})
    with pytest.raises(ValueError, match="strategy"):
        config(library, "telepathy")
    with pytest.raises(ValueError, match="classifier_expert"):
        AdaptConfig(strategy="classifier", task="math", experts=["x.safetensors"])
    with pytest.raises(ValueError, match="not found"):
        run_adapt(config(library, "prompt").model_copy(update={"experts": ["missing.safetensors"]}))


@pytest.mark.slow
def test_score_mode_agrees_with_generate_mode_on_easy_prompts(smollm2):
    model, tokenizer = smollm2
    questions = [
        "What is 17 + 25?",
        "Compute 12 * 7.",
        "Write a Python function that reverses a string.",
        "Which is heavier, a feather or a brick?",
    ]
    scored = classify(model, tokenizer, questions, mode="score")
    assert scored == classify(model, tokenizer, questions, mode="generate")
    assert scored == ["math", "math", "code", "reasoning"]


def test_prefix_cached_scores_equal_the_whole_prompt(tiny, tokenizer, monkeypatch):
    """Through the KV decoder (its prefill from a cached prefix) and through Hugging Face's forward alike."""
    from t2ray.adapt.dispatch import PrefixScorer, classification_ids

    questions = [
        "What is 2 + 2?",
        "Write a function that reverses a list.",
        "Hi",
        "A much longer question about trains leaving two stations at different speeds, when do they meet?",
    ]
    scorer = PrefixScorer(tiny, tokenizer)
    assert all(classification_ids(tokenizer, q)[: len(scorer.prefix_ids)] == scorer.prefix_ids for q in questions)
    with torch.no_grad():
        whole = torch.stack(
            [
                tiny(input_ids=torch.tensor([classification_ids(tokenizer, q)])).logits[0, -1][scorer.label_ids]
                for q in questions
            ]
        )
    torch.testing.assert_close(scorer.scores(questions), whole, atol=1e-4, rtol=1e-4)  # grouped by length
    one_forward = PrefixScorer(tiny, tokenizer, forward_cost_tokens=math.inf)
    torch.testing.assert_close(one_forward.scores(questions), whole, atol=1e-4, rtol=1e-4)
    labels = [scorer.labels[k] for k in whole.argmax(-1).tolist()]
    assert classify(tiny, tokenizer, questions, mode="score", batch_size=3) == labels  # batches of 3 + 1
    keys, _ = scorer._caches["base"]
    assert scorer.kv and keys.shape[2] == len(scorer.prefix_ids)  # the KV decoder's keys of the prefix
    monkeypatch.setenv("T2RAY_DECODE", "hf")
    hf = PrefixScorer(tiny, tokenizer)
    assert not hf.kv
    torch.testing.assert_close(hf.scores(questions), whole, atol=1e-4, rtol=1e-4)


def test_cli_adapt_token_over_lora_folders_prints_an_accuracy(lora_library, tmp_path):
    """The issue's command: `t2ray adapt --strategy token … --expert <LoRA folder> …` answered "Is a directory"."""
    from typer.testing import CliRunner

    from t2ray.cli import app

    experts = [w for t in ("math", "code", "reasoning") for w in ("--expert", str(lora_library[t]))]
    done = CliRunner().invoke(
        app,
        [
            "adapt",
            "--strategy",
            "token",
            "--task",
            "math",
            "--limit",
            "2",
            "--every",
            "2",
            "--model",
            "tiny-llama",
            *experts,
        ],
    )
    assert done.exit_code == 0, done.output
    summary = json.loads(done.stdout[done.stdout.index("{") :])
    assert summary["n"] == 2 and 0.0 <= summary["accuracy"] <= 1.0


def test_lora_fewshot_mixture_file_evaluates_from_the_cli(lora_library, tmp_path):
    """`adapt --mixture-out` over LoRA folders writes a mixture `eval --mixture` reads (relative folder paths)."""
    from typer.testing import CliRunner

    from t2ray.cli import app

    experts = [w for t in ("math", "code", "reasoning") for w in ("--expert", str(lora_library[t]))]
    found = tmp_path / "found.json"
    done = CliRunner().invoke(
        app,
        [
            "adapt",
            "--strategy",
            "fewshot",
            "--task",
            "math",
            "--model",
            "tiny-llama",
            "--limit",
            "2",
            "--population",
            "4",
            "--generations",
            "2",
            "--shots",
            "2",
            *experts,
            "--mixture-out",
            str(found),
        ],
    )
    assert done.exit_code == 0, done.output
    alpha = json.loads(done.stdout[done.stdout.index("{") :])["alpha"]
    mixture, adapters = load_mixture(found)
    assert mixture.alpha == alpha and [a.name for a in adapters] == ["lora-math", "lora-code", "lora-reasoning"]
    evaluated = CliRunner().invoke(
        app, ["eval", "--model", "tiny-llama", "--task", "math", "--limit", "2", "--mixture", str(found)]
    )
    assert evaluated.exit_code == 0, evaluated.output
    summary = json.loads(evaluated.stdout[evaluated.stdout.index("{") :])
    assert summary["n"] == 2 and summary["adapter"] == "lora-mixture:fewshot-math"


def test_eval_mix_of_one_lora_folder_is_the_peft_adapter(lora_library, tokenizer):
    """--mix FOLDER:1 (t2ray's mixture layer) computes what --expert FOLDER (PEFT) does, and changes the answers."""
    from t2ray.evaluate import evaluate
    from t2ray.library import load_adapted
    from t2ray.tasks import get_task

    mixed, _, label = load_adapted("tiny-llama", mix=f"{lora_library['math']}:1", dtype="float32")
    peft, _, peft_label = load_adapted("tiny-llama", expert=lora_library["math"], dtype="float32")
    assert (label, peft_label) == ("lora-mix:lora-math=1", "lora:lora-math")
    batch = tokenizer(["What is 2 + 2?", "Name a prime."], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(mixed(**batch).logits, peft(**batch).logits, atol=1e-4, rtol=1e-4)
    task = get_task("math")
    base = load_adapted("tiny-llama", dtype="float32")[0]
    answers = [[r["completion"] for r in evaluate(m, tokenizer, task, limit=2).records] for m in (mixed, base)]
    assert answers[0] != answers[1]


def test_lora_mixtures_refuse_what_they_cannot_mean(library, lora_library, tmp_path):
    from t2ray.experts import ExpertError
    from t2ray.library import load_adapted

    with pytest.raises(ExpertError, match="not both"):
        load_adapted("tiny-llama", mix=f"{library['math']}:0.5,{lora_library['code']}:0.5")
    per_module = tmp_path / "per-module.json"
    per_module.write_text(
        json.dumps(
            {
                "format_version": 1,
                "kind": "t2ray-mixture",
                "name": "m",
                "experts": [str(lora_library["math"]), str(lora_library["code"])],
                "alpha": [[0.5, 0.5], [0.5, 0.5]],
            }
        )
    )
    with pytest.raises(ExpertError, match="per-module.json: alpha over LoRA adapters is one weight per adapter"):
        load_mixture(per_module)


def test_length_groups_are_the_cheapest_partition():
    """Any partition of the rows into padded forwards costs at least what length_groups' does (brute force)."""
    from t2ray.adapt.dispatch import length_groups

    def cost(groups, lengths, fixed):
        return sum(fixed + len(g) * max(lengths[i] for i in g) for g in groups)

    def partitions(items):
        if not items:
            yield []
            return
        first, rest = items[0], items[1:]
        for part in partitions(rest):
            yield [[first], *part]
            for k in range(len(part)):
                yield [*part[:k], [first, *part[k]], *part[k + 1 :]]

    rng = random.Random(0)
    for _ in range(30):
        lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 7))]
        fixed = rng.choice([0.0, 5.0, 25.0, 1000.0])
        groups = length_groups(lengths, fixed)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        every = partitions(list(range(len(lengths))))
        assert cost(groups, lengths, fixed) == min(cost(p, lengths, fixed) for p in every)
    assert length_groups([30, 31, 80, 79], math.inf) == [[0, 1, 3, 2]] and length_groups([], 25.0) == []
