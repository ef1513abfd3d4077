"""`t2ray report RUN_DIR`: the paper's tables from a run folder, as markdown + CSV + JSON, with plots.

Layout read (what `t2ray quickstart` writes):
  RUN_DIR/table1/{base,lora,svf}-{task}.json     EvalResult JSON (trained tasks)
  RUN_DIR/table2/{strategy}-{task}.json          EvalResult / AdaptResult JSON (unseen tasks)
  RUN_DIR/table2-lora/{column}-{task}.json       the same over the LoRA adapters: single_<category>, token<k>, fewshot
  RUN_DIR/*/metrics.jsonl                        training runs (learning curves)
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

TABLE1_COLUMNS = ("base", "lora", "svf")
TABLE2_COLUMNS = ("base", "prompt", "classifier", "nearest", "fewshot", "token")
DISPATCH_STRATEGIES = ("prompt", "classifier", "nearest")  # those a run measured, side by side
LORA_TABLE2_LEGEND = (
    "best single: the adapter with the best accuracy on that task, picked on the test items (an "
    "oracle, as Belofsky 2023's baseline); token k: routed every k tokens; fewshot: CEM's α per "
    "adapter. base: Table 2's base model on the same items."
)


def _load(folder: Path) -> dict[tuple[str, str], dict]:
    """(column, task) -> result dict, from files named COLUMN-TASK.json."""
    out = {}
    for path in sorted(folder.glob("*.json")) if folder.exists() else []:
        column, _, task = path.stem.partition("-")
        out[(column, task)] = json.loads(path.read_text())
    return out


Z95 = 1.959964  # two-sided 95 %


def wilson_interval(correct: int, n: int) -> tuple[float, float]:
    """95 % Wilson score interval of an accuracy: honest at 0/n and n/n, where p ± 2·s.e. is not."""
    if n == 0:
        return 0.0, 1.0
    p, z2 = correct / n, Z95**2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(result: dict, base: dict) -> tuple[float, float, float, int] | None:
    """Accuracy minus the base model's on the items both answered (same ids): the mean of d_i ∈ {−1, 0, 1} with a
    95 % normal interval. Pairing takes the items' own difficulty out of the noise."""
    mine = {r["id"]: int(bool(r["correct"])) for r in result.get("records", [])}
    theirs = {r["id"]: int(bool(r["correct"])) for r in base.get("records", [])}
    d = [mine[i] - theirs[i] for i in sorted(mine.keys() & theirs.keys())]
    if len(d) < 2:
        return None
    mean = sum(d) / len(d)
    half = Z95 * math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
    return mean, mean - half, mean + half, len(d)


def _cell(results: dict, column: str, task: str) -> str:
    """`acc [95 % Wilson]`, and for a non-base column `Δ paired difference vs base [95 %]`, * when it excludes 0."""
    r = results[(column, task)]
    low, high = wilson_interval(r["correct"], r["n"])
    text = f"{r['accuracy']:.1%} [{low:.0%}–{high:.0%}]"
    diff = paired_difference(r, results[("base", task)]) if column != "base" and ("base", task) in results else None
    if diff:
        mean, low, high, _ = diff
        text += (
            "; Δ +0.0 (no item differs)"
            if low == high == 0
            else f"; Δ {100 * mean:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]{'*' if low > 0 or high < 0 else ''}"
        )
    return text


def significance_reading(results: dict, columns: tuple[str, ...]) -> list[str]:
    """Per task and column: the paired difference vs base, said plainly as significant or within noise."""
    lines = []
    for task in sorted({t for _, t in results}):
        for column in columns:
            if column == "base" or (column, task) not in results or ("base", task) not in results:
                continue
            diff = paired_difference(results[(column, task)], results[("base", task)])
            if diff is None:
                continue
            mean, low, high, n = diff
            if low == high == 0:
                lines.append(f"- {task}, {column}: graded like the base model on every one of the {n} items.")
                continue
            verdict = (
                "significantly better than"
                if low > 0
                else "significantly worse than"
                if high < 0
                else "not distinguishable from"
            )
            lines.append(
                f"- {task}, {column}: {100 * mean:+.1f} points vs base (95 % [{100 * low:+.1f}, "
                f"{100 * high:+.1f}], n = {n} paired items): {verdict} the base model."
            )
    return lines


def _table(results: dict, columns: tuple[str, ...]) -> tuple[list[str], list[list[str]]]:
    tasks = sorted({task for _, task in results})
    rows = [[task] + [_cell(results, c, task) if (c, task) in results else "–" for c in columns] for task in tasks]
    return ["task", *columns], rows


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _write_csv(path: Path, header, rows) -> None:
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


def fewshot_reading(table2: dict) -> list[str]:
    """Per unseen task: few-shot CEM vs the best single-expert strategy (prompt / classifier dispatch), as a paired
    difference on the same items, said plainly as significant or not."""
    lines = []
    for task in sorted({t for _, t in table2}):
        singles = [
            (table2[(c, task)]["accuracy"], c) for c in ("prompt", "classifier", "nearest") if (c, task) in table2
        ]
        if ("fewshot", task) not in table2 or not singles:
            continue
        _, name = max(singles)
        diff = paired_difference(table2[("fewshot", task)], table2[(name, task)])
        if diff is None:
            continue
        mean, low, high, n = diff
        if low == high == 0:
            lines.append(
                f"- {task}: few-shot and {name}, the better single-expert strategy, are graded alike on "
                f"every one of the {n} items."
            )
            continue
        verdict = "significantly better" if low > 0 else "significantly worse" if high < 0 else "not distinguishable"
        lines.append(
            f"- {task}: few-shot vs {name}, the better single-expert strategy: {100 * mean:+.1f} points "
            f"(95 % [{100 * low:+.1f}, {100 * high:+.1f}], n = {n} paired items): {verdict}."
        )
    return lines


def _on_items(result: dict, ids: set) -> dict:
    """The result restricted to the items `ids` (accuracy recounted), so every column of a table covers the same."""
    records = [r for r in result.get("records", []) if r["id"] in ids]
    correct = sum(bool(r["correct"]) for r in records)
    return {
        **result,
        "records": records,
        "n": len(records),
        "correct": correct,
        "accuracy": correct / max(1, len(records)),
    }


def lora_table2_results(lora: dict, table2: dict) -> tuple[dict, tuple[str, ...], list[str]]:
    """(results keyed (column, task), columns, notes): base (Table 2's, on the LoRA items), the best single adapter,
    token routing every k, few-shot α."""
    results, notes = {}, []
    for task in sorted({t for _, t in lora}):
        singles = {c.removeprefix("single_"): r for (c, t), r in lora.items() if t == task and c.startswith("single_")}
        if singles:
            top = max(r["accuracy"] for r in singles.values())
            best = [c for c in sorted(singles) if singles[c]["accuracy"] == top]
            results[("best single", task)] = singles[best[0]]
            notes.append(
                f"{task}: best single adapter = {' = '.join(best)}{' (tied)' if len(best) > 1 else ''} ("
                + ", ".join(f"{c} {r['accuracy']:.1%}" for c, r in sorted(singles.items()))
                + ")"
            )
        for (column, t), r in lora.items():
            if t == task and not column.startswith("single_"):
                results[(column, task)] = r
        ids = {rec["id"] for (_, t), r in results.items() if t == task for rec in r.get("records", [])}
        if ("base", task) in table2 and ids:
            results[("base", task)] = _on_items(table2[("base", task)], ids)
    tokens = sorted({c for c, _ in results if c.startswith("token")}, key=lambda c: int(c.removeprefix("token")))
    columns = tuple(c for c in ("base", "best single", *tokens, "fewshot") if any(k == c for k, _ in results))
    return results, columns, notes


def console_summary(report: Path) -> str:
    """The report as the console prints it: the text without the image links."""
    return "\n".join(line for line in report.read_text().splitlines() if not line.startswith("!["))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, ax, path: Path, *, legend: bool = True) -> None:
    """Write and close a figure (line plots get the shared small legend and grid)."""
    if legend:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)


def plot_accuracy_bars(results: dict, columns, path: Path, title: str) -> None:
    plt = _pyplot()
    import numpy as np

    tasks = sorted({t for _, t in results})
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(tasks), 3.4), dpi=110)
    width = 0.8 / len(columns)
    for i, column in enumerate(columns):
        cells = [results.get((column, t)) for t in tasks]
        values = [r["accuracy"] if r else np.nan for r in cells]
        bounds = [wilson_interval(r["correct"], r["n"]) if r else (np.nan, np.nan) for r in cells]
        below = [max(0.0, v - low) for v, (low, _) in zip(values, bounds, strict=True)]
        above = [max(0.0, high - v) for v, (_, high) in zip(values, bounds, strict=True)]
        # error bars: the 95 % Wilson interval of each cell (what the table prints in brackets)
        ax.bar(np.arange(len(tasks)) + i * width, values, width, label=column, yerr=[below, above], capsize=3)
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks)
    ax.set(ylabel="accuracy", ylim=(0, 1), title=title)
    ax.legend(fontsize=8, ncol=len(columns))
    ax.grid(axis="y", alpha=0.3)
    _save(fig, ax, path, legend=False)


def plot_learning_curves(run_dir: Path, path: Path) -> bool:
    plt = _pyplot()

    runs = sorted(p.parent for p in run_dir.glob("*/metrics.jsonl"))
    if not runs:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    for run in runs:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        evals = [r for r in rows if "valid_accuracy" in r]
        (line,) = ax.plot([r["iteration"] for r in rows], [r["accuracy"] for r in rows], alpha=0.35)
        ax.plot(
            [r["iteration"] for r in evals],
            [r["valid_accuracy"] for r in evals],
            "o-",
            color=line.get_color(),
            label=run.name,
        )
    ax.set(
        xlabel="iteration",
        ylabel="accuracy (line: rollouts, dots: valid)",
        ylim=(0, 1),
        title="RL training of the experts",
    )
    _save(fig, ax, path)
    return True


def plot_cem_alpha(table2: dict, path: Path) -> bool:
    plt = _pyplot()
    import numpy as np

    found = {task: r for (c, task), r in table2.items() if c == "fewshot" and r.get("alpha") is not None}
    if not found:
        return False
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(found), 3.4), dpi=110)
    for i, (_task, r) in enumerate(sorted(found.items())):
        alpha = np.asarray(r["alpha"], dtype=float)
        alpha = alpha.mean(axis=1) if alpha.ndim == 2 else alpha  # per-module α: mean over modules
        names = r.get("expert_names") or [f"expert {k}" for k in range(len(alpha))]
        bottom = 0.0
        for k, (name, a) in enumerate(zip(names, alpha, strict=True)):
            ax.bar(i, a, bottom=bottom, color=f"C{k}", label=name if i == 0 else None)
            bottom += a
    ax.set_xticks(range(len(found)), sorted(found))
    ax.set(ylabel="α (stacked)", title="few-shot CEM mixing weights per unseen task")
    ax.legend(fontsize=8)
    _save(fig, ax, path, legend=False)
    return True


def dispatch_strategies(dispatch: dict) -> list[str]:
    return [s for s in DISPATCH_STRATEGIES if s in dispatch]


def dispatch_tables(dispatch: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """Per strategy: the confusion matrix (rows: true category, columns: pass 1's label) with per-class accuracy."""
    tables = []
    for strategy in dispatch_strategies(dispatch):
        c = dispatch[strategy]
        labels = c["labels"]
        header = ["true category", *labels, "per-class accuracy"]
        rows = [
            [true, *map(str, row), f"{c['per_class'][true]:.1%}"]
            for true, row in zip(labels, c["counts"], strict=True)
            if true in c["per_class"]
        ]
        tables.append((strategy, header, rows))
    return tables


def plot_confusion(dispatch: dict, path: Path) -> None:
    plt = _pyplot()
    import numpy as np

    strategies = dispatch_strategies(dispatch)
    fig, axes = plt.subplots(1, len(strategies), figsize=(4.2 * len(strategies), 3.6), dpi=110)
    for ax, strategy in zip(np.atleast_1d(axes), strategies, strict=True):
        c = dispatch[strategy]
        rows = [k for k, label in enumerate(c["labels"]) if label in c["per_class"]]
        counts = np.asarray(c["counts"], dtype=float)[rows]
        share = counts / counts.sum(1, keepdims=True)  # row-normalised: each true category sums to 1
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for i in range(share.shape[0]):
            for j in range(share.shape[1]):
                ax.text(
                    j,
                    i,
                    f"{share[i, j]:.2f}\n({int(counts[i, j])})",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if share[i, j] > 0.6 else "black",
                )
        ax.set_xticks(range(len(c["labels"])), c["labels"])
        ax.set_yticks(range(len(rows)), [c["labels"][k] for k in rows])
        ax.set(xlabel="pass 1 label", ylabel="true category", title=f"{strategy}: accuracy {c['accuracy']:.1%}")
    _save(fig, ax, path, legend=False)


def plot_cem_fitness(table2: dict, path: Path) -> bool:
    """Per generation: the best candidate's and the population's accuracy on the shots, and the best candidate's
    mean log-likelihood of the reference answers (CEM's tie-break, which moves while few shots are right)."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    found = {task: r["history"] for (c, task), r in table2.items() if c == "fewshot" and r.get("history")}
    if not found:
        return False
    fig, (acc, ll) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    for k, (task, history) in enumerate(sorted(found.items())):
        gens = [h["generation"] for h in history]
        acc.plot(gens, [h["best_accuracy"] for h in history], "o-", color=f"C{k}", label=f"{task}: best")
        acc.plot(
            gens,
            [h["mean_accuracy"] for h in history],
            "--",
            color=f"C{k}",
            alpha=0.6,
            label=f"{task}: population mean",
        )
        ll.plot(gens, [h["best_loglik"] for h in history], "o-", color=f"C{k}", label=task)
    acc.set(
        xlabel="CEM generation",
        ylabel="accuracy on the shots",
        ylim=(-0.02, 1.02),
        title="few-shot CEM fitness per generation",
    )
    ll.set(
        xlabel="CEM generation", ylabel="mean log-likelihood of the references", title="the best candidate's tie-break"
    )
    for ax in (acc, ll):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    _save(fig, acc, path, legend=False)
    return True


def served_section(served: dict) -> list[str]:
    """The requests a run sent to its Ray Serve endpoint (model "auto"): what pass 1 chose, what came back."""
    rows = [
        [
            r["task"],
            r["question"][:80].replace("\n", " ").replace("|", "/"),
            r["expert"],
            f"{r['pass1_ms']:.0f}",
            r["answer"][:80].replace("\n", " ").replace("|", "/"),
        ]
        for r in served["requests"]
    ]
    chosen = sum(r["expert"] == r["own_expert"] for r in served["requests"])
    return [
        "## Served — the experts behind an OpenAI-compatible endpoint",
        "",
        f"Ray Serve, model `auto` (pass 1: {served['strategy']}), the official `openai` client: "
        f"{len(rows)} requests answered, {chosen} sent to their own task's expert.",
        "",
        _markdown(["task", "question", "expert chosen", "pass 1 (ms)", "answer"], rows),
        "",
    ]


def build_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    table1, table2 = _load(run_dir / "table1"), _load(run_dir / "table2")
    if not table1 and not table2:
        raise ValueError(f"{run_dir}: no table1/ or table2/ results to report (run `t2ray quickstart` first)")
    sections = ["# t2ray report", ""]
    tables = {}
    for name, results, columns, title in (
        ("table1", table1, TABLE1_COLUMNS, "Table 1 — trained tasks: base vs adapted (test accuracy)"),
        ("table2", table2, TABLE2_COLUMNS, "Table 2 — unseen tasks: two-pass strategies (test accuracy)"),
    ):
        if results:
            columns = tuple(c for c in columns if any(column == c for column, _ in results))  # the run's own
            tables[name] = _table(results, columns)
            sections += [
                f"## {title}",
                "",
                _markdown(*tables[name]),
                "",
                "Cells: accuracy [95 % Wilson interval]; Δ: the paired difference vs base on the same items, "
                "in points [95 % interval]; * where that interval excludes 0.",
                "",
                *significance_reading(results, columns),
                "",
                f"![{name}](report/{name}.png)",
                "",
            ]
            if name == "table1":
                sections += [
                    "Adapters evaluated: "
                    + "; ".join(
                        f"{column} on {task} = `{r['adapter']}`"
                        for (column, task), r in sorted(results.items())
                        if column != "base" and r.get("adapter")
                    ),
                    "",
                ]
            plot_accuracy_bars(results, columns, out / f"{name}.png", title.split(" (")[0])
            if name == "table2" and (reading := fewshot_reading(results)):
                sections += ["Few-shot adaptation vs the best single expert:", "", *reading, ""]
    lora = _load(run_dir / "table2-lora")
    if lora:
        results, columns, notes = lora_table2_results(lora, table2)
        tables["table2_lora"] = _table(results, columns)
        title = "Table 2 (LoRA) — unseen tasks: LoRA adapters routed per token, mixed by few-shot α (test accuracy)"
        sections += [
            f"## {title}",
            "",
            _markdown(*tables["table2_lora"]),
            "",
            LORA_TABLE2_LEGEND,
            "",
            *[f"- {n}" for n in notes],
            "",
            *significance_reading(results, columns),
            "",
            "![table2_lora](report/table2_lora.png)",
            "",
        ]
        plot_accuracy_bars(results, columns, out / "table2_lora.png", title.split(" (test")[0])
    if table2:
        timed = {k: v for k, v in table2.items() if "pass1_s" in v}
        header3 = ["task", "strategy", "pass 1 (s)", "pass 2 (s)", "pass 1 ÷ pass 2"]
        rows3 = [
            [t, c, f"{r['pass1_s']:.1f}", f"{r['pass2_s']:.1f}", f"{r['pass1_over_pass2']:.1%}"]
            for (c, t), r in sorted(timed.items(), key=lambda kv: (kv[0][1], kv[0][0]))
        ]
        tables["table3"] = (header3, rows3)
        sections += [
            "## Table 3 — time of pass 1 vs pass 2",
            "",
            _markdown(header3, rows3),
            "",
            "Few-shot pass 1 is the CEM search, run once per task (not per query).",
            "",
        ]
        if plot_cem_alpha(table2, out / "cem_alpha.png"):
            sections += ["![CEM α](report/cem_alpha.png)", ""]
        if plot_cem_fitness(table2, out / "cem_fitness.png"):
            sections += ["![CEM fitness](report/cem_fitness.png)", ""]
    if (run_dir / "dispatch.json").exists():
        dispatch = json.loads((run_dir / "dispatch.json").read_text())
        sections += [
            "## Dispatch quality — pass 1's category vs the true one",
            "",
            "Over the test queries of the trained and unseen tasks ("
            + ", ".join(f"{t}: {c}" for t, c in dispatch["categories"].items())
            + ").",
            "",
        ]
        for strategy, header, rows in dispatch_tables(dispatch):
            tables[f"dispatch_{strategy}"] = (header, rows)
            sections += [
                f"**{strategy}** (accuracy {dispatch[strategy]['accuracy']:.1%}, n = {dispatch[strategy]['n']})",
                "",
                _markdown(header, rows),
                "",
            ]
        plot_confusion(dispatch, out / "dispatch_confusion.png")
        sections += ["![dispatch confusion](report/dispatch_confusion.png)", ""]
    if (run_dir / "serve.json").exists():
        sections += served_section(json.loads((run_dir / "serve.json").read_text()))
    if plot_learning_curves(run_dir, out / "learning_curves.png"):
        sections += ["## Learning curves", "", "![learning curves](report/learning_curves.png)", ""]
    for name, (header, rows) in tables.items():
        _write_csv(out / f"{name}.csv", header, rows)
    (out / "tables.json").write_text(
        json.dumps({k: {"header": h, "rows": r} for k, (h, r) in tables.items()}, indent=2)
    )
    report = run_dir / "report.md"
    report.write_text("\n".join(sections))
    return report
