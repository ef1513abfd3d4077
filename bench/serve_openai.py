"""Issue 5's acceptance check: `t2ray serve experiments/serve-smollm2.yaml` with the quickstart's experts, talked
to by the official `openai` client, unchanged. Run from the repository root after `make demo`.

    .venv/bin/python bench/serve_openai.py [--config experiments/serve-smollm2.yaml] [--port 8000] [--no-write]

Starts the real command in a subprocess (its own local Ray, 2 CPUs), waits for /healthz, then: models.list, a
chat completion for each of auto / math / code / reasoning / math-code (the saved mixture), a streamed chat, a
text completion; prints each answer, the mixture the server reports and the latency; stops the server with
SIGINT (as Ctrl-C would) and checks that it exits cleanly.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, publish, stamp, wait_healthy  # noqa: E402

QUESTIONS = {
    "auto": "What is 17 + 25? Reply with just the number.",
    "math": "What is 6 * 7? Reply with just the number.",
    "code": "Write a Python function `double(x)` that returns twice x.",
    "reasoning": "Which is heavier, a feather or a brick? Answer with one word.",
    "math-code": "What is 9 + 10? Reply with just the number.",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=Path("experiments/serve-smollm2.yaml"))
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    config = yaml.safe_load(args.config.read_text())
    config["http_options"]["port"] = args.port
    url = f"http://127.0.0.1:{args.port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("T2RAY_API_KEY", None)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as tmp:
        yaml.safe_dump(config, tmp)
    t2ray = str(Path(sys.executable).with_name("t2ray"))
    proc = subprocess.Popen([t2ray, "serve", tmp.name, "--num-cpus", "2"], env=env, start_new_session=True)
    rows = []
    try:
        startup = wait_healthy(f"{url}/healthz", proc, name="t2ray serve")
        client = OpenAI(base_url=f"{url}/v1", api_key="not-needed")
        models = [m.id for m in client.models.list().data]
        for model, question in QUESTIONS.items():
            start = time.perf_counter()
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": question}], max_tokens=48, temperature=0
            )
            used = (reply.model_extra or {}).get("t2ray", {})
            rows.append(
                (
                    f"chat `{model}`",
                    reply.choices[0].message.content,
                    json.dumps(used.get("mixture")),
                    time.perf_counter() - start,
                )
            )
        start = time.perf_counter()
        stream = client.chat.completions.create(
            model="math",
            stream=True,
            max_tokens=24,
            temperature=0,
            messages=[{"role": "user", "content": QUESTIONS["math"]}],
        )
        chunks = [c.choices[0].delta.content or "" for c in stream if c.choices]
        rows.append(
            ("chat `math`, stream", "".join(chunks) + f" ({len(chunks)} chunks)", "", time.perf_counter() - start)
        )
        start = time.perf_counter()
        text = client.completions.create(model="code", prompt="def add(a, b):", max_tokens=24, temperature=0)
        rows.append(("completion `code`", text.choices[0].text, "", time.perf_counter() - start))
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = "killed after 120 s"
        os.unlink(tmp.name)

    def cell(text: str) -> str:
        return " ".join(str(text).split()).replace("|", "\\|")[:90]

    table = "\n".join(
        f"| {call} | {cell(answer)} | {cell(mix)} | {seconds:.1f} |" for call, answer, mix, seconds in rows
    )
    text = f"""`{command_line()}` — {stamp()}

`t2ray serve {args.config}` (port {args.port}, 2 CPUs) with the quickstart's SVF experts; the official `openai`
client (`OpenAI(base_url=.../v1)`), unchanged. Ready (healthz 200) {startup:.0f} s after the command started;
`models.list()`: {", ".join(models)}. Greedy answers:

| call | answer | mixture the server reports | s |
|---|---|---|---:|
{table}

Server exit code after SIGINT: {code}.
"""
    publish("serve_openai", text, not args.no_write)


if __name__ == "__main__":
    main()
