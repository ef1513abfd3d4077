"""Every shipped YAML under experiments/ runs as a user types it: the command line from the README or from the
file's own header, in a shell that exports nothing (PATH with the activated venv, HOME, and the test's temp
dirs), each command starting its own local Ray as it does on a laptop (`t2ray submit`: a `ray start --head`).
Tiny budgets are appended as `--set` overrides (or repeated flags, the last one wins); the search algorithm,
scheduler, strategy and model of each file stay as shipped.

The module runs top to bottom in one working directory, as a user would: the experts trained first are the ones
that the adapt, CEM-sweep and serve files name (runs/smollm2-*/, and runs/quickstart/svf-*/ for serving)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import openai
import pytest
import yaml

from t2ray.config import load_experiment
from t2ray.experts import load_expert, save_expert

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# One RL iteration of 2 prompts, one validation of 2 items at its end, short rollouts.
TINY_RL = ["rl.iterations=1", "rl.batch_size=2", "rl.eval_interval=1", "rl.eval_limit=2", "rl.max_new_tokens=8"]


def sets(*pairs: str) -> list[str]:
    return [word for pair in pairs for word in ("--set", pair)]


def header_command(path: Path, verb: str, about: str | None = None) -> str:
    """The `t2ray <verb> <about>` line of the file's header comment (`about`: by default the file itself)."""
    about = path.relative_to(ROOT).as_posix() if about is None else about
    for line in path.read_text().splitlines():
        if line.startswith("#") and f"t2ray {verb} {about}" in line:
            return line.lstrip("# ").split("  ")[0].split(";")[0].strip()
    raise AssertionError(f"{path.name}: no `t2ray {verb} {about}` line in its header")


def readme_line(line: str) -> str:
    assert line in README, f"README.md no longer has `{line}`"
    return line


@dataclass
class Shell:
    """A bare shell in a working directory holding a copy of the repository's experiments/."""

    env: dict[str, str]
    cwd: Path

    def run(self, line: str, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [*shlex.split(line), *extra], cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode == 0, (
            f"`{line} {' '.join(extra)}` exited {done.returncode}\n--- stdout\n"
            f"{done.stdout[-2000:]}\n--- stderr\n{done.stderr[-4000:]}"
        )
        return done

    def last_json(self, done: subprocess.CompletedProcess) -> dict:
        text = done.stdout
        return json.JSONDecoder().raw_decode(text[text.rindex("\n{") + 1 if "\n{" in text else text.index("{") :])[0]


@pytest.fixture(scope="module")
def shell(tmp_path_factory, t2ray_cache) -> Shell:
    work, home = tmp_path_factory.mktemp("work"), tmp_path_factory.mktemp("home")
    shutil.copytree(ROOT / "experiments", work / "experiments")  # a clone's files (uploaded whole by submit)
    venv_bin = str(Path(sys.executable).parent)
    env = {"PATH": f"{venv_bin}:{os.environ['PATH']}", "HOME": str(home), "T2RAY_CACHE": str(t2ray_cache)}
    return Shell(env, work)


def expert_of(shell: Shell, run: str) -> Path:
    path = shell.cwd / "runs" / run / "expert.safetensors"
    assert path.is_file(), f"{path} was not written"
    return path


# (smollm2-cls.yaml trains through the same command path in tests/train/test_quickstart.py, on tiny-llama)
def test_train_the_smollm2_math_expert_as_its_header_says(shell):
    """(reasoning's file runs the same command: checked below; code's expert is trained by `t2ray submit`)"""
    name = "math"
    yaml_path = ROOT / "experiments" / f"smollm2-{name}.yaml"
    done = shell.run(header_command(yaml_path, "train"), *sets(*TINY_RL))
    summary = shell.last_json(done)
    assert summary["iterations"] == 1 and 0.0 <= summary["best_valid_accuracy"] <= 1.0
    assert Path(summary["expert"]) == expert_of(shell, f"smollm2-{name}")
    token = Path(shell.env["HOME"]) / ".ray" / "auth_token"  # the local cluster ran in token mode, its token 0600
    assert token.is_file() and stat.S_IMODE(token.stat().st_mode) == 0o600
    console = done.stdout + done.stderr  # t2ray's bar, drawn by the driver from the reports; no framework floods
    assert f"train smollm2-{name}" in done.stderr and "1/1" in done.stderr, console[-3000:]
    for flood in (
        "Reporting training result",
        "RayTrainWorker",
        "TrainController",
        "DeepSpeed",
        "Loading weights",
        "Started a local Ray instance",
    ):
        assert flood not in console, flood


def test_the_reasoning_yaml_trains_through_the_same_command():
    """smollm2-reasoning.yaml's header is the math file's command with its own path (trained above on math: the same
    Ray Train run, another task)."""
    path = ROOT / "experiments" / "smollm2-reasoning.yaml"
    assert header_command(path, "train") == "t2ray train experiments/smollm2-reasoning.yaml"
    assert load_experiment(path).task == "reasoning"


def test_submit_the_code_expert_to_a_local_head(shell, ray_head_starter, tmp_path):
    """`t2ray submit --address http://127.0.0.1:8265 experiments/…` (README) to a `ray start --head` typed in the
    same bare shell: the job trains experiments/smollm2-code.yaml on the cluster, in the uploaded working dir."""
    with ray_head_starter(shell.env, tmp_path) as (dashboard, _):
        line = readme_line(
            "t2ray submit --address http://127.0.0.1:8265 experiments/smollm2-math.yaml "
            "--requirements req.txt --uv --wait"
        )
        line = line.replace("http://127.0.0.1:8265", dashboard).replace("smollm2-math", "smollm2-code")
        line = line.replace(" --requirements req.txt --uv", "")  # no package index here: nothing to install
        runs = shell.cwd / "runs"
        done = shell.run(line, *sets(*TINY_RL, f"storage_path={runs}"))
        assert "SUCCEEDED" in done.stdout + done.stderr
    expert_of(shell, "smollm2-code")


@pytest.mark.parametrize("name", ["llama3-8b-svf", "llama3-70b-svf"])
def test_the_cluster_experiments_plan_as_their_header_says(shell, name):
    yaml_path = ROOT / "experiments" / f"{name}.yaml"
    assert "fits" in shell.run(header_command(yaml_path, "plan", about="--experiment")).stdout


# (the 70B file trains on a stand-in in tests/train/test_ranks.py: its worker on two CPU ranks, no Ray)


def test_the_70b_serve_file_plans_as_its_header_says(shell):
    """experiments/serve-llama3-70b.yaml: one replica over 4 × 80 GB GPUs fits (on 1 or 2 it does not:
    tests/test_plan.py; a replica split over GPUs: tests/serve/test_gpus.py)."""
    yaml_path = ROOT / "experiments" / "serve-llama3-70b.yaml"
    done = shell.run(header_command(yaml_path, "plan", about="--serve experiments/serve-llama3-70b.yaml"))
    assert "one replica on 4×80 GB" in done.stdout and done.stdout.rstrip().endswith("fits"), done.stdout


def test_rl_sweep_as_shipped_random_search_and_asha(shell):
    """experiments/sweeps/rl-smollm2.yaml validates as the README types it: random search, ASHA (a sweep of this
    kind runs below with PBT, and ASHA's stopping and the export of a runnable best.yaml in tests/tune)."""
    sweep = yaml.safe_load((ROOT / "experiments/sweeps/rl-smollm2.yaml").read_text())
    assert sweep["search"]["alg"] == "random" and sweep["scheduler"]["type"] == "asha"
    checked = shell.run(readme_line("t2ray tune experiments/sweeps/rl-smollm2.yaml"), "--check").stdout
    assert '"search": "random"' in checked and "asha" in checked, checked
    assert readme_line("t2ray train runs/sweeps/rl-smollm2/best.yaml")


def test_pbt_sweep_as_shipped_exploits_checkpoints(shell):
    """experiments/sweeps/pbt-smollm2.yaml: PBT perturbs at every validation (each a z checkpoint): the lower trial
    continues from the upper one's checkpoint with perturbed settings; the sweep finishes and writes best.yaml. On
    tiny-llama: what is proven is the file's PBT with checkpoints, not SmolLM2's learning (the math file's test)."""
    done = shell.run(
        readme_line("t2ray tune experiments/sweeps/pbt-smollm2.yaml"),
        *sets(
            "overrides.model.spec=tiny-llama",
            "num_samples=2",
            "overrides.rl.iterations=3",
            "overrides.rl.eval_interval=1",
            "overrides.rl.eval_limit=2",
            "overrides.rl.batch_size=2",
            "overrides.rl.max_new_tokens=8",
            "scheduler.quantile_fraction=0.5",
        ),
        timeout=900,
    )  # of 2 trials, the lower one exploits the upper one
    summary = shell.last_json(done)
    assert summary["finished"] == 2 and summary["errored"] == 0, summary
    console = done.stdout + done.stderr  # the driver's bar, not Tune's status tables (those with --verbose)
    assert "tune pbt-smollm2" in done.stderr and "Trial status" not in console, console[-3000:]
    assert "Configuration for experiment" not in console, console[:3000]  # Tune's box, even at verbose=0
    assert "core_worker.cc" not in console, console[-3000:]  # no C++ error line per wandb logging actor
    sweep_dir = shell.cwd / "runs/sweeps/pbt-smollm2"
    assert (sweep_dir / "best.yaml").is_file() and (sweep_dir / "results.csv").is_file()
    assert load_experiment(sweep_dir / "best.yaml").task == "math"
    assert len(list((sweep_dir / "trials").iterdir())) >= 2  # the trials' Train runs, not under Ray's session folder
    clones = sweep_dir / "tune/pbt_global.txt"  # Tune's log of each clone
    assert clones.is_file() and clones.read_text().strip(), "no trial exploited a checkpoint"
    assert list((sweep_dir / "tune").glob("pbt_policy_*.txt")), "no trial's policy log"


def test_fewshot_adapt_yaml_as_the_readme_types_it(shell):
    """experiments/sweeps/fewshot-smollm2.yaml names the three experts trained above; the README's line, with a
    tiny CEM appended (flags override the YAML). The reasoning expert is the math one negated (z → its complement):
    training it would repeat the math file's run."""
    math = load_expert(expert_of(shell, "smollm2-math"))
    negated = {module: -p for module, p in math.params.items()}
    reasoning = replace(math, name="smollm2-reasoning", task="reasoning", params=negated)
    save_expert(reasoning, shell.cwd / "runs/smollm2-reasoning/expert.safetensors")
    done = shell.run(
        readme_line("t2ray adapt --config experiments/sweeps/fewshot-smollm2.yaml --limit 64"),
        "--limit",
        "2",
        "--population",
        "2",
        "--generations",
        "1",
        "--shots",
        "2",
    )
    summary = shell.last_json(done)
    assert summary["strategy"] == "fewshot" and summary["n"] == 2 and len(summary["alpha"]) == 3


def test_cem_sweep_as_shipped_and_the_readmes_hyperopt_line(shell):
    """The shipped CEM sweep (Optuna, FIFO): trials report every generation without the metric (Optuna raised
    KeyError 'valid_accuracy'; wandb without a key stopped it at once). The README's HyperOpt variant validates here
    (`--check`); HyperOpt runs, is interrupted and resumes in tests/tune/test_sweeps.py."""
    hyperopt = readme_line(
        "t2ray tune experiments/sweeps/cem-smollm2.yaml --set num_samples=16 --set search.alg=hyperopt"
    )
    assert '"search": "hyperopt"' in shell.run(hyperopt, "--check").stdout
    done = shell.run(
        header_command(ROOT / "experiments/sweeps/cem-smollm2.yaml", "tune"),
        *sets(
            "num_samples=1",
            "name=cem-optuna",
            "space.cem.population.choice=[2,3]",
            "space.cem.generations.choice=[1]",
            "space.cem.shots.choice=[2]",
            "overrides.limit=4",
        ),
    )
    summary = shell.last_json(done)
    assert summary["finished"] == 1, summary
    sweep_dir = shell.cwd / "runs/sweeps/cem-optuna"
    assert (sweep_dir / "best.yaml").is_file() and (sweep_dir / "best-mixture.json").is_file()
    assert list(sweep_dir.glob("wandb/offline-run-*")), "wandb (on in the file) wrote no offline run"


def test_serve_beyond_loopback_refuses_to_start_without_an_api_key(shell):
    """No open endpoint by accident: bound beyond loopback without T2RAY_API_KEY, `t2ray serve` says how to set one
    and starts nothing."""
    line = readme_line("t2ray serve experiments/serve-smollm2.yaml")
    done = subprocess.run(
        [*shlex.split(line), "--host", "0.0.0.0"], cwd=shell.cwd, env=shell.env, capture_output=True, text=True
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "without an API key: set T2RAY_API_KEY" in done.stderr and "require_api_key: false" in done.stderr


def test_serve_start_one_request_stop(shell):
    """`t2ray serve experiments/serve-smollm2.yaml --host 0.0.0.0` with the experts where the file expects them (make
    demo's runs/quickstart/svf-*) and an API key: it prints where it serves, a request without the key (or with a
    wrong one) from the network gets 401, the official client with the key gets an answer, Ctrl-C stops it."""
    import httpx
    from ray.util import get_node_ip_address

    for name in ("math", "code"):
        target = shell.cwd / "runs/quickstart" / f"svf-{name}" / "expert.safetensors"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(expert_of(shell, f"smollm2-{name}"), target)
    line = readme_line("t2ray serve experiments/serve-smollm2.yaml")
    key = "t2ray-test-key"
    proc = subprocess.Popen(
        [*shlex.split(line), "--host", "0.0.0.0"],
        cwd=shell.cwd,
        env={**shell.env, "T2RAY_API_KEY": key},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        seen = []
        for out in proc.stdout:  # the JSON object printed once the endpoint is up
            seen.append(out)
            if out.rstrip() == "}" and any('"openai_base_url"' in s for s in seen):
                break
        else:
            pytest.fail(f"`{line}` ended before serving:\n{''.join(seen)[-4000:]}")
        printed = "".join(seen)
        info = json.loads(printed[printed.rindex("\n{") + 1 :])
        assert info["auth"] == "Bearer $T2RAY_API_KEY", info
        base_url = info["openai_base_url"]["t2ray"].replace("0.0.0.0", get_node_ip_address())  # from the network
        question = {"model": "math", "max_tokens": 4, "messages": [{"role": "user", "content": "What is 2 + 3?"}]}
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            refused = httpx.post(f"{base_url}/chat/completions", json=question, headers=headers, timeout=60)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key", refused.text
        client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=300)
        answer = client.chat.completions.create(
            model="math", max_tokens=4, messages=[{"role": "user", "content": "What is 2 + 3?"}]
        )
        assert answer.choices[0].message.content and answer.model_extra["t2ray"]["mixture"]["label"] == "expert:math"
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, rest[-3000:]


@pytest.mark.parametrize("name", ["reproduce-smollm2", "paper-smollm2", "paper-llama3-8b"])
def test_quickstart_configs_check_as_their_header_says(shell, name):
    """The hours-long pipeline files: their header's `--check` line validates every stage's config and prints
    the plan (their stages run end to end on tiny-llama in tests/train/test_quickstart.py)."""
    rel = f"experiments/{name}.yaml"
    done = shell.run(header_command(ROOT / rel, "quickstart", about=f"--config {rel} --check"))
    assert f"quickstart --check: {rel} is valid; nothing was run" in done.stdout
