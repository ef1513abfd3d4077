"""What the quickstart's Table 2 over LoRA adapters costs on SmolLM2: its stages (each adapter alone, token routing
every k tokens, few-shot α; the default `lora_table2` tasks and items) run on given trained adapters, each stage's
measured minutes beside the estimate the quickstart prints, then the report's LoRA table.

    .venv/bin/python bench/lora_table2.py --adapters MATH CODE REASONING [--root /tmp/lora-table2] [--no-write]

MATH CODE REASONING: LoRA expert folders (runs/quickstart/lora-{math,code,reasoning}/expert after a quickstart).
The base model is evaluated first on the same items (Table 2's base column; not part of the cost). Writes the
section "## lora_table2_cost" of bench/RESULTS.md unless --no-write.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import command_line, stamp, write_section  # noqa: E402

from t2ray.quickstart import (
    CATEGORIES,
    QuickstartConfig,
    evaluation,
    items_tested,
    lora_table2_stages,  # noqa: E402
    run_stages,
)
from t2ray.report import build_report  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", nargs=3, type=Path, required=True, metavar=("MATH", "CODE", "REASONING"))
    ap.add_argument("--root", type=Path, default=Path("/tmp/lora-table2"))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    qs = QuickstartConfig()
    tasks = qs.lora_table2.tasks or qs.unseen
    for t in tasks:
        out = args.root / "table2" / f"base-{t}.json"
        if not out.exists():
            evaluation(qs, t, qs.lora_table2.limit, out)()
    stages = lora_table2_stages(
        qs,
        args.root / "table2-lora",
        dict(zip(CATEGORIES, args.adapters, strict=True)),
        {t: items_tested(qs, t) for t in tasks},
        lambda minutes: minutes,
    )
    rows = []
    start = time.perf_counter()
    for stage in stages:
        began = time.perf_counter()
        run_stages([stage])
        rows.append(
            f"| {stage.name.removeprefix('Table 2 (LoRA): ')} | {stage.minutes:.1f} | "
            f"{(time.perf_counter() - began) / 60:.1f} |"
        )
    total = (time.perf_counter() - start) / 60
    table = build_report(args.root).read_text().split("## Table 2 (LoRA)")[1].split("\n## ")[0]
    load = os.getloadavg()[0]
    text = "\n".join(
        [
            f"`{command_line()}` — {stamp()}",
            "",
            f"The default `lora_table2` ({', '.join(tasks)}; {qs.lora_table2.limit} items; every "
            f"{qs.lora_table2.every}) on SmolLM2 (bf16, 2 cores), load average {load:.1f} at the end: "
            f"**{total:.1f} min** for {len(stages)} stages "
            f"(estimated {sum(s.minutes for s in stages):.1f}).",
            "",
            "| stage | estimated min | measured min |",
            "|---|---:|---:|",
            *rows,
            "",
            "The report's table:",
            "",
            "## Table 2 (LoRA)" + table.rstrip(),
        ]
    )
    print(text)
    if not args.no_write:
        write_section("lora_table2_cost", text.replace("## Table 2 (LoRA)", "**Table 2 (LoRA)**"))


if __name__ == "__main__":
    main()
