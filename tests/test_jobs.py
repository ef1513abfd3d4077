"""Job submission: the runtime_env and `ray job submit` line (no cluster), then `t2ray submit`/`jobs` against a
real local multi-node cluster started as users start one: `ray start --head` (dashboard on 127.0.0.1, 1 CPU), then
`ray start --address=…` twice for two worker nodes with 2 CPUs and the `trainer` resource each (one cluster for the
module, started and stopped here)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from tune.helpers import write_experiment, write_task  # tests/tune/helpers.py
from typer.testing import CliRunner

from t2ray import jobs
from t2ray.cli import app

runner = CliRunner()


def invoke(*args, **kwargs):
    return runner.invoke(app, list(map(str, args)), **kwargs)


@pytest.fixture
def workdir(tmp_path) -> Path:
    write_task(tmp_path)
    write_experiment(tmp_path, "has-e.yaml")  # relative: resolved in the job's working dir on the cluster
    return tmp_path


# ------------------------------------------------------------------------------------------- no cluster


def test_runtime_env_forwards_caller_env_and_requirements(workdir, monkeypatch):
    for key in jobs.FORWARDED_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "secret-value")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    req = workdir / "requirements.txt"
    req.write_text("# pinned\nnumpy>=1.26\n\nrich\n")
    env = jobs.runtime_env(workdir, requirements=req, installer="uv", env=jobs.parse_env(["EXTRA=1"]))
    assert env["working_dir"] == str(workdir) and ".venv" in env["excludes"] and "runs" in env["excludes"]
    assert env["uv"] == {"packages": ["numpy>=1.26", "rich"]}
    assert env["env_vars"] == {
        "WANDB_API_KEY": "secret-value",
        "HF_HUB_OFFLINE": "1",
        "EXTRA": "1",
        "RAY_CHDIR_TO_TRIAL_DIR": "0",
    }
    assert jobs.runtime_env(workdir, requirements=req)["pip"] == {"packages": ["numpy>=1.26", "rich"]}
    monkeypatch.setenv("MY_VAR", "x")
    assert jobs.parse_env(["MY_VAR", "A=b=c"]) == {"MY_VAR": "x", "A": "b=c"}
    with pytest.raises(ValueError, match="not set in your environment"):
        jobs.parse_env(["NOT_SET_ANYWHERE_123"])
    with pytest.raises(ValueError, match="expected KEY or KEY=VALUE"):
        jobs.parse_env(["1BAD=x"])
    with pytest.raises(FileNotFoundError, match="no such requirements file"):
        jobs.runtime_env(workdir, requirements=workdir / "nope.txt")


def test_entrypoint_and_equivalent_ray_cli_line(workdir, monkeypatch):
    kind, entry = jobs.entrypoint_for(workdir / "tiny.yaml", workdir, ["rl.lr=0.01", "tracking.project=my project"])
    assert kind == "experiment"
    assert entry == "t2ray train tiny.yaml --set rl.lr=0.01 --set 'tracking.project=my project'"
    monkeypatch.setenv("WANDB_API_KEY", "secret-value")
    env = jobs.runtime_env(workdir)
    line = jobs.ray_cli_line("http://10.0.0.1:8265", env, entry, submission_id="run-1", entrypoint_num_cpus=1)
    assert line.startswith(f"ray job submit --address http://10.0.0.1:8265 --working-dir {workdir}")
    assert "secret-value" not in line and "<redacted" in line and "--submission-id run-1" in line
    assert line.endswith("-- t2ray train tiny.yaml --set rl.lr=0.01 --set 'tracking.project=my project'")
    runtime = json.loads(line.split("--runtime-env-json ")[1].split(" --submission-id")[0].strip("'"))
    assert runtime["excludes"] == jobs.EXCLUDES
    # a sweep YAML runs `t2ray tune`; a file outside the uploaded dir, or an invalid one, never leaves here
    sweep = workdir / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"name": "s", "base": "tiny.yaml", "space": {"rl.lr": {"choice": [0.1]}}}))
    assert jobs.entrypoint_for(sweep, workdir, []) == ("sweep", "t2ray tune sweep.yaml")
    with pytest.raises(ValueError, match="is not inside the working dir"):
        jobs.entrypoint_for(workdir / "tiny.yaml", workdir / "task", [])
    with pytest.raises(ValueError, match="rl.lrr|extra"):
        jobs.entrypoint_for(workdir / "tiny.yaml", workdir, ["rl.lrr=1"])
    assert jobs.storage_warning(workdir / "tiny.yaml", []) is None  # absolute storage_path
    assert "is relative" in jobs.storage_warning(workdir / "tiny.yaml", ["storage_path=runs"])


def test_unreachable_address_is_a_clear_error(workdir, free_port):
    address = f"http://127.0.0.1:{free_port()}"
    result = invoke("submit", workdir / "tiny.yaml", "--address", address, "--working-dir", workdir)
    assert result.exit_code == 2
    assert f"cannot reach a Ray dashboard at {address}" in result.output and "Traceback" not in result.output
    result = invoke("jobs", "status", "raysubmit_x", "--address", address)
    assert result.exit_code == 2 and "Is the cluster up?" in result.output


# ------------------------------------------------------------------------------------ a real local head


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, t2ray_cache, ray_head_starter):
    """A local head with its dashboard, started as `.venv/bin/ray start` from a shell whose PATH lacks the venv:
    the job's `t2ray` used to be "not found" (exit 127); a head on this machine runs this installation's t2ray."""
    path = ":".join(
        p for p in os.environ["PATH"].split(":") if Path(p).resolve() != Path(sys.executable).parent.resolve()
    )
    env = {
        **os.environ,
        "PATH": path,
        "RAY_AUTH_MODE": "token",
        "RAY_ADDRESS": "",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
        "DS_ACCELERATOR": "cpu",
        "WANDB_MODE": "offline",
        "HF_HUB_OFFLINE": "1",
    }
    nodes = ({"num_cpus": 2, "resources": {"trainer": 2}},) * 2
    with ray_head_starter(env, tmp_path_factory.mktemp("ray-head"), num_cpus=1, worker_nodes=nodes) as addresses:
        yield addresses  # (dashboard, GCS)


@pytest.fixture(scope="module")
def head(cluster) -> str:
    return cluster[0]


def first_json(text: str) -> dict:
    return json.JSONDecoder().raw_decode(text[text.index("{") :])[0]


def wait_for(job_id, address, states, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = jobs.status(job_id, address=address)["status"]
        if state in states:
            return state
        time.sleep(1)
    raise AssertionError(f"job {job_id} not in {states} after {timeout} s (last: {state})")


@pytest.mark.slow
def test_submit_trains_on_both_worker_nodes_and_its_logs_are_retrievable(head, workdir):
    """A job trains an expert from its uploaded dir, its Train workers on the two worker nodes (STRICT_SPREAD over
    `trainer`); the caller's --env reaches it; status, logs and list find it."""
    data = yaml.safe_load((workdir / "tiny.yaml").read_text())
    data["scaling"].update(num_workers=2, placement_strategy="STRICT_SPREAD", resources={"trainer": 1})
    (workdir / "spread.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    runs = workdir / "runs"
    result = invoke(
        "submit",
        workdir / "spread.yaml",
        "--address",
        head,
        "--working-dir",
        workdir,
        "--set",
        "rl.iterations=2",
        "--set",
        f"storage_path={runs}",
        "--env",
        "T2RAY_TEST_MARK=42",
        "--wait",
    )
    assert result.exit_code == 0, result.output
    assert "ray job submit --address " + head in result.output  # the equivalent Ray CLI line
    summary = first_json(result.stdout)
    job_id = summary["job_id"]
    own_t2ray = str(Path(sys.executable).with_name("t2ray"))  # a local head: this installation's t2ray
    assert summary["entrypoint"].startswith(f"{own_t2ray} train spread.yaml --set rl.iterations=2")
    assert summary["runtime_env"]["env_vars"]["T2RAY_TEST_MARK"] == "42"
    assert (runs / "tiny" / "expert.safetensors").is_file()  # trained on the cluster, 2 workers, 2 iterations
    placed = [json.loads(line) for line in (runs / "tiny" / "workers.jsonl").read_text().splitlines()]
    assert len(placed) == 2 and len({p["node_id"] for p in placed}) == 2, placed  # one worker per worker node

    status = invoke("jobs", "status", job_id, "--address", head)
    assert status.exit_code == 0 and json.loads(status.stdout)["status"] == "SUCCEEDED"
    logs = invoke("jobs", "logs", job_id, "--address", head, "--tail", "200")
    assert logs.exit_code == 0 and '"best_valid_accuracy"' in logs.stdout and '"iterations": 2' in logs.stdout
    listed = invoke("jobs", "list", "--address", head)
    assert job_id in listed.stdout


@pytest.mark.slow
def test_failing_job_shows_its_log_tail_and_stop_works(head, workdir):
    # A task that only the cluster can find out about: the job fails there, and its logs say why.
    failed = invoke(
        "submit",
        workdir / "tiny.yaml",
        "--address",
        head,
        "--working-dir",
        workdir,
        "--set",
        "task=no-such-task",
        "--wait",
    )
    assert failed.exit_code == 1
    assert "FAILED" in failed.output and "unknown task 'no-such-task'" in failed.output
    job_id = first_json(failed.stdout)["job_id"]
    status = invoke("jobs", "status", job_id, "--address", head)
    assert status.exit_code == 1 and "unknown task 'no-such-task'" in status.output

    # A long run, stopped while it trains.
    long = jobs.submit(
        workdir / "tiny.yaml",
        address=head,
        working_dir=workdir,
        overrides=["rl.iterations=100000", f"storage_path={workdir / 'runs'}", "name=long"],
    )
    wait_for(long.job_id, head, {"RUNNING"})
    stopped = invoke("jobs", "stop", long.job_id, "--address", head, "--wait", "120")
    assert stopped.exit_code == 0, stopped.output
    assert json.loads(stopped.stdout)["status"] == "STOPPED"
    assert invoke("jobs", "status", "no-such-job", "--address", head).exit_code == 2


@contextlib.contextmanager
def log_stream_cutting_proxy(dashboard: str, after_s: float):
    """A TCP proxy in front of the dashboard that passes HTTP through and aborts every log-tail websocket `after_s`
    seconds in, without a close frame (what a client sees, code 1006, when a busy head drops the stream)."""
    host, port = dashboard.removeprefix("http://").split(":")
    loop = asyncio.new_event_loop()

    async def pipe(reader, writer):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def handle(client_r, client_w):
        up_r, up_w = await asyncio.open_connection(host, int(port))
        first = await client_r.read(65536)
        up_w.write(first)
        pipes = [asyncio.ensure_future(pipe(client_r, up_w)), asyncio.ensure_future(pipe(up_r, client_w))]
        cut = b"/logs/tail" in first.split(b"\r\n", 1)[0]
        try:
            await asyncio.wait(pipes, timeout=after_s if cut else None, return_when=asyncio.ALL_COMPLETED)
        finally:  # the cut (or the end, or the proxy's shutdown): both sides go at once
            for task in pipes:
                task.cancel()
            client_w.transport.abort()
            up_w.transport.abort()

    async def shutdown():
        server.close()
        handlers = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    server = loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.mark.slow
def test_follow_survives_a_dropped_log_stream(head):
    """`--follow`/`--wait` stream the logs over a websocket; when it drops mid-job, the rest is polled: every line
    shown once, and the job's real outcome (not exit 2)."""
    from ray.job_submission import JobSubmissionClient

    lines = 16
    script = f"import time\nfor i in range({lines}):\n    print('line', i, flush=True)\n    time.sleep(0.5)"
    job_id = JobSubmissionClient(head).submit_job(entrypoint=f"{sys.executable} -c {shlex.quote(script)}")
    with log_stream_cutting_proxy(head, after_s=3) as proxy:
        followed = invoke("jobs", "logs", job_id, "--address", proxy, "--follow")
    assert followed.exit_code == 0, followed.output
    assert f"the log stream of job {job_id} dropped" in followed.stderr
    shown = [line for line in followed.stdout.splitlines() if line.startswith("line ")]
    assert shown == [f"line {i}" for i in range(lines)]
    assert first_json(followed.stdout[followed.stdout.index(f"line {lines - 1}") :])["status"] == "SUCCEEDED"


# ------------------------------------------------------------------- the cluster refuses who lacks the token


def outsider_env(tmp_path: Path, **auth: str) -> dict[str, str]:
    """A process of another user of this machine: its own home (no ~/.ray/auth_token), none of our Ray settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "T2RAY_"))}
    return {**env, "HOME": str(tmp_path), **auth}


OUTSIDER_DRIVER = """
import sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
print("RAN", ray.get(ray.remote(lambda: 42).remote()))
"""


@pytest.mark.slow
def test_a_driver_without_the_token_is_refused(cluster, tmp_path):
    """No token, authentication turned off on the client's side, a wrong token: each driver is refused (run side by
    side: a refused driver gives up after Ray's ~20 s of connection retries)."""
    attempts = {
        "no-token": {},
        "auth-disabled": {"RAY_AUTH_MODE": "disabled"},
        "wrong-token": {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64},
    }
    drivers = {
        name: subprocess.Popen(
            [sys.executable, "-c", OUTSIDER_DRIVER, cluster[1]],
            env=outsider_env(tmp_path / name, **auth),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, auth in attempts.items()
    }
    for name, driver in drivers.items():
        out, err = driver.communicate(timeout=180)
        assert driver.returncode != 0 and "RAN" not in out, (name, out, err[-2000:])


@pytest.mark.slow
@pytest.mark.parametrize("header", [None, "Bearer " + "0" * 64], ids=["no-token", "wrong-token"])
def test_the_dashboard_and_its_jobs_api_refuse_requests_without_the_token(head, header):
    import httpx

    headers = {"Authorization": header} if header else {}
    for path in ("/api/jobs/", "/api/version", "/nodes?view=summary"):
        response = httpx.get(head + path, headers=headers, timeout=30)
        assert response.status_code in (401, 403), (path, response.status_code, response.text[:200])
    submit = httpx.post(head + "/api/jobs/", json={"entrypoint": "echo pwned"}, headers=headers, timeout=30)
    assert submit.status_code in (401, 403), submit.text[:200]
    token = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    assert httpx.get(head + "/api/jobs/", headers={"Authorization": f"Bearer {token}"}, timeout=30).status_code == 200


@pytest.mark.slow
def test_t2ray_jobs_without_the_token_says_how_to_give_one(head, tmp_path):
    run = subprocess.run(
        [str(Path(sys.executable).with_name("t2ray")), "jobs", "list", "--address", head],
        env=outsider_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stdout + run.stderr
    message = run.stderr.strip().splitlines()
    assert len(message) == 1 and "requires a Ray authentication token" in message[0], run.stderr
    assert all(way in message[0] for way in ("RAY_AUTH_TOKEN=", "RAY_AUTH_TOKEN_PATH=", "~/.ray/auth_token"))
