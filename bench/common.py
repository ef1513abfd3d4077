"""Shared bench helpers: interleaved timing (noise hits every variant alike) and RESULTS.md sections."""

from __future__ import annotations

import datetime as dt
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from t2ray.console import apply_env_defaults
from t2ray.ray_auth import enable_token_auth

apply_env_defaults()  # a benchmark runs with the CLI's defaults (wandb offline, tokenizers quiet)
enable_token_auth(create=True)  # and its local Ray clusters in token mode, as t2ray's own
RESULTS = Path(__file__).with_name("RESULTS.md")


class Seconds(float):
    """What a variant returns to report its own measurement of the call (a server timing its generate call, the pipe
    round trip not counted): `interleaved` records it in place of the call's wall time."""


def interleaved(
    variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, warm_each: bool = False
) -> dict[str, list[float]]:
    """Seconds per call for each variant; rounds rotate the order so a noisy moment is shared. `warm_each`: every
    timed call comes right after an untimed one of the same variant, so that it finds its own weights in the CPU's
    cache as a long run would (a Xeon's 300 MiB L3 holds a 135M-parameter bf16 model: a variant timed cold pays
    for whichever ran before it, RESULTS generation_materialised_lookup)."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if warm_each:
                variants[name]()
            start = time.perf_counter()
            result = variants[name]()
            wall = time.perf_counter() - start
            times[name].append(result if isinstance(result, Seconds) else wall)
    return times


def timed(call: Callable[[], object]) -> float:
    """Seconds one call takes."""
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def wait_healthy(
    url: str, proc, timeout: float = 300, *, name: str = "the server", details: Callable[[], str] = lambda: ""
) -> float:
    """Seconds until GET `url` answers 200 (a server started as `proc`); ends the bench if `proc` exits first or
    the time runs out, with `details()` (e.g. its log's tail) appended."""
    import httpx

    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited early with code {proc.returncode}{details()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"{name} did not answer {url} within {timeout:.0f} s{details()}")


def medians_after_warmup(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Per measure, the median over every round but the first (the warm-up)."""
    return {key: statistics.median(r[key] for r in rounds[1:]) for key in rounds[0]}


def best(times: list[float]) -> float:
    return min(times)


def median(times: list[float]) -> float:
    return statistics.median(times)


def command_line() -> str:
    return " ".join([".venv/bin/python", *map(shlex.quote, sys.argv)])


def cpu_description() -> str:
    """This CPU as a figure should name it: its model, torch's kernel capability and the bf16 instructions it has
    (machines of one kind differ: AMX tiles, AVX512-BF16 or AVX2 only change which path `auto` and oneDNN take)."""
    import platform

    import torch

    model, flags = platform.machine(), set()
    try:
        for row in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = row.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    bf16 = ", ".join(f for f in ("avx512_bf16", "amx_bf16", "avx_ne_convert") if f in flags) or "no bf16 instructions"
    return f"{model}, capability {torch.backends.cpu.get_cpu_capability()} ({bf16})"


def stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def write_section(heading: str, text: str) -> None:
    """Replace (or append) the '## heading' section of bench/RESULTS.md, leaving the others alone."""
    section = f"## {heading}"
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    block = f"{section}\n\n{text.strip()}\n\n"
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else old.rstrip() + "\n\n" + block
    RESULTS.write_text(new.rstrip() + "\n")


def publish(heading: str, lines: list[str] | str, write: bool) -> str:
    """Print a result (its lines, or its text) and, if `write`, make it the '## heading' section of RESULTS.md."""
    text = lines if isinstance(lines, str) else "\n".join(lines)
    print(text)
    if write:
        write_section(heading, text)
        print("\nwritten to bench/RESULTS.md", file=sys.stderr)
    return text
