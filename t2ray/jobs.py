"""Job submission to a Ray cluster through its dashboard (`JobSubmissionClient`): `t2ray submit` uploads a
working directory, runs `t2ray train EXPERIMENT.yaml` (or `t2ray tune SWEEP.yaml`) on the cluster with a
runtime_env (pip/uv requirements, environment variables passed from the caller), and prints the equivalent
`ray job submit` line. Status, logs and stop go through the same client."""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from t2ray.ray_auth import enable_token_auth, refused_message

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Passed to the job when set in the caller's environment (values never printed).
FORWARDED_ENV = (
    "WANDB_API_KEY",
    "WANDB_MODE",
    "WANDB_PROJECT",
    "WANDB_ENTITY",
    "HF_TOKEN",
    "HF_HUB_OFFLINE",
    "TOKENIZERS_PARALLELISM",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
)
SECRET = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", re.I)
# Not uploaded with the working directory (Ray also honours .gitignore files).
EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "runs",
    "wandb",
    "**/__pycache__",
    "*.egg-info",
    ".pytest_cache",
    "*.safetensors",
    "*.gguf",
]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_WAIT_S = 60  # how long a submission waits for a freshly started head's job agent


class JobError(RuntimeError):
    """A cluster or job problem, as one user-facing message."""


def default_address() -> str:
    return os.environ.get("T2RAY_JOBS_ADDRESS") or os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_ADDRESS


def connect(address: str | None = None):
    """A JobSubmissionClient (it sends the Ray token when one is at hand), or a JobError that says how to bring a
    cluster up, or how to give the token a cluster asks for."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    enable_token_auth(create=False)
    address = address or default_address()
    try:
        return JobSubmissionClient(address)
    except AuthenticationError:
        raise JobError(refused_message(f"the Ray cluster at {address}")) from None
    except Exception as err:  # noqa: BLE001 — ConnectionError, ValueError, RuntimeError depending on the failure
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise JobError(
            f"cannot reach a Ray dashboard at {address} ({reason}). Is the cluster up? Locally: "
            "`ray start --head --dashboard-host 127.0.0.1`; cloud: `ray up cluster/aws-gpu.yaml` then "
            "`ray dashboard cluster/aws-gpu.yaml`; KubeRay: `kubectl port-forward "
            "svc/t2ray-head-svc 8265:8265`. Or pass --address."
        ) from None


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _call(fn, what: str, job_id: str | None = None):
    from ray.exceptions import AuthenticationError

    try:
        return fn()
    except JobError:
        raise
    except AuthenticationError:
        raise JobError(refused_message("the Ray cluster")) from None
    except Exception as err:  # noqa: BLE001 — the SDK raises RuntimeError for HTTP errors
        text = _first_line(err)
        if job_id and ("does not exist" in text or "404" in text or "not found" in text.lower()):
            raise JobError(f"no job {job_id!r} on this cluster (t2ray jobs list shows the jobs)") from None
        raise JobError(f"{what} failed: {text}") from None


def parse_env(pairs: list[str]) -> dict[str, str]:
    """['KEY=VALUE', 'KEY'] -> env vars; a bare KEY takes the caller's value (error if unset)."""
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"--env {pair!r}: expected KEY or KEY=VALUE")
        if not sep:
            if key not in os.environ:
                raise ValueError(f"--env {key}: not set in your environment (give KEY=VALUE)")
            value = os.environ[key]
        env[key] = value
    return env


def read_requirements(path: Path) -> list[str]:
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such requirements file") from None
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def runtime_env(
    working_dir: Path,
    *,
    requirements: Path | None = None,
    installer: str = "pip",
    env: dict[str, str] | None = None,
    forward: bool = True,
) -> dict:
    """The job's runtime_env: the uploaded working dir, packages to install, env vars from the caller."""
    if installer not in ("pip", "uv"):
        raise ValueError(f"installer must be pip or uv, got {installer!r}")
    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if forward and k in os.environ}
    env_vars.update(env or {})
    # Train (and Tune) would move each worker into its run folder; stay in the uploaded working dir, so the
    # relative paths of the YAML (task files, model folders) mean on the cluster what they mean here.
    env_vars.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    out: dict = {"working_dir": str(working_dir), "excludes": list(EXCLUDES)}
    if requirements:
        out[installer] = {"packages": read_requirements(requirements)}
    if env_vars:
        out["env_vars"] = env_vars
    return out


def t2ray_command(address: str) -> str:
    """How the job calls t2ray: on a head on this machine, this installation's own executable (that head's PATH
    may not hold the virtual env: `.venv/bin/ray start` without activating it); elsewhere `t2ray` on its PATH."""
    import socket
    import sys
    from urllib.parse import urlparse

    own = Path(sys.executable).with_name("t2ray")
    local = urlparse(address if "://" in address else f"http://{address}").hostname in (
        "127.0.0.1",
        "localhost",
        "::1",
        socket.gethostname(),
    )
    return shlex.quote(str(own)) if local and own.exists() else "t2ray"


def entrypoint_for(config: Path, working_dir: Path, overrides: list[str], t2ray: str = "t2ray") -> tuple[str, str]:
    """(kind, the command the job runs): `t2ray train` for an experiment, `t2ray tune` for a sweep; the file
    path is taken relative to the uploaded working dir."""
    from t2ray.config import load_experiment, read_yaml

    config, working_dir = Path(config).resolve(), Path(working_dir).resolve()
    try:
        rel = config.relative_to(working_dir)
    except ValueError:
        raise ValueError(
            f"{config} is not inside the working dir {working_dir}: it is uploaded with it (pass --working-dir)"
        ) from None
    raw = read_yaml(config)
    if "space" in raw:
        from t2ray.tune import load_sweep

        load_sweep(config, overrides)  # validate here: a bad sweep fails before it reaches the cluster
        kind, command = "sweep", f"{t2ray} tune"
    else:
        load_experiment(config, overrides)
        kind, command = "experiment", f"{t2ray} train"
    parts = [command, shlex.quote(rel.as_posix())] + [f"--set {shlex.quote(o)}" for o in overrides]
    return kind, " ".join(parts)


def storage_warning(config: Path, overrides: list[str]) -> str | None:
    """A relative storage_path lands in the job's temporary working dir on the cluster: say so."""
    from t2ray.config import deep_merge, parse_overrides, read_yaml

    data = deep_merge(read_yaml(config), parse_overrides(overrides))
    path = data.get("storage_path", "runs" if "space" not in data else "runs/sweeps")
    if not Path(str(path)).expanduser().is_absolute():
        return (
            f"storage_path {path!r} is relative: on the cluster it is inside the job's temporary working dir "
            "(gone with it); use shared storage, e.g. --set storage_path=/mnt/shared/t2ray-runs"
        )
    return None


def _redacted(env: dict) -> dict:
    out = json.loads(json.dumps(env))
    for k in list(out.get("env_vars", {})):
        if SECRET.search(k):
            out["env_vars"][k] = "<redacted: set it yourself>"
    return out


def ray_cli_line(
    address: str,
    env: dict,
    entrypoint: str,
    submission_id: str | None = None,
    entrypoint_num_cpus: float | None = None,
    entrypoint_num_gpus: float | None = None,
) -> str:
    """The same submission with the `ray job submit` CLI (secret env values redacted)."""
    rest = {k: v for k, v in _redacted(env).items() if k != "working_dir"}
    parts = ["ray job submit", f"--address {shlex.quote(address)}", f"--working-dir {shlex.quote(env['working_dir'])}"]
    if rest:
        parts.append(f"--runtime-env-json {shlex.quote(json.dumps(rest))}")
    if submission_id:
        parts.append(f"--submission-id {shlex.quote(submission_id)}")
    if entrypoint_num_cpus is not None:
        parts.append(f"--entrypoint-num-cpus {entrypoint_num_cpus:g}")
    if entrypoint_num_gpus is not None:
        parts.append(f"--entrypoint-num-gpus {entrypoint_num_gpus:g}")
    parts += ["--no-wait", "--", entrypoint]
    return " ".join(parts)


@dataclass
class Submitted:
    job_id: str
    address: str
    entrypoint: str
    kind: str
    ray_command: str
    runtime_env: dict
    warning: str | None = None

    def summary(self) -> dict:
        return {
            "job_id": self.job_id,
            "address": self.address,
            "kind": self.kind,
            "entrypoint": self.entrypoint,
            "ray_command": self.ray_command,
            "runtime_env": _redacted(self.runtime_env),
            "follow": f"t2ray jobs logs {self.job_id} --address {self.address} --follow",
            **({"warning": self.warning} if self.warning else {}),
        }


def submit(
    config: Path,
    *,
    address: str | None = None,
    working_dir: Path | None = None,
    overrides: list[str] | None = None,
    requirements: Path | None = None,
    installer: str = "pip",
    env: dict[str, str] | None = None,
    submission_id: str | None = None,
    entrypoint_num_cpus: float | None = None,
    entrypoint_num_gpus: float | None = None,
    metadata: dict[str, str] | None = None,
) -> Submitted:
    """Validate the YAML here, then submit it as a Ray job that runs `t2ray train` / `t2ray tune` on the cluster."""
    address = address or default_address()
    working_dir = Path(working_dir or Path.cwd()).resolve()
    if not working_dir.is_dir():
        raise FileNotFoundError(f"{working_dir}: working dir not found")
    kind, entry = entrypoint_for(Path(config), working_dir, list(overrides or []), t2ray_command(address))
    env_ = runtime_env(working_dir, requirements=requirements, installer=installer, env=env)
    client = connect(address)

    def send():
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                return client.submit_job(
                    entrypoint=entry,
                    runtime_env=env_,
                    submission_id=submission_id,
                    entrypoint_num_cpus=entrypoint_num_cpus,
                    entrypoint_num_gpus=entrypoint_num_gpus,
                    metadata={"t2ray": kind, **(metadata or {})},
                )
            except RuntimeError as err:  # a head that just started has no job agent for a few seconds
                if "No available agent" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(2)

    job_id = _call(send, "job submission")
    return Submitted(
        job_id,
        address,
        entry,
        kind,
        ray_cli_line(address, env_, entry, submission_id, entrypoint_num_cpus, entrypoint_num_gpus),
        env_,
        storage_warning(Path(config), list(overrides or [])),
    )


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def status(job_id: str, *, address: str | None = None, log_lines: int = 40) -> dict:
    """Status, message, timings; a failed job also carries the tail of its logs."""
    client = connect(address)
    info = _call(lambda: client.get_job_info(job_id), "job status", job_id)
    out = {
        "job_id": job_id,
        "status": str(getattr(info.status, "value", info.status)),
        "message": info.message,
        "entrypoint": info.entrypoint,
        "start_time": info.start_time and time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.start_time / 1000)),
        "end_time": info.end_time and time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.end_time / 1000)),
        "driver_exit_code": getattr(info, "driver_exit_code", None),
    }
    if out["status"] == "FAILED":
        try:
            out["logs_tail"] = tail(client.get_job_logs(job_id), log_lines)
        except Exception as err:  # noqa: BLE001 — the failure itself is known; its logs may be out of reach
            out["logs_tail"] = f"(the logs could not be fetched: {_first_line(err)})"
    return out


def logs(job_id: str, *, address: str | None = None, lines: int | None = None) -> str:
    client = connect(address)
    text = _call(lambda: client.get_job_logs(job_id), "job logs", job_id)
    return tail(text, lines) if lines else text


def follow(job_id: str, *, address: str | None = None, out=None, poll: float = 1.0) -> str:
    """Stream a job's logs until it ends; returns its final status. The stream is a websocket that the dashboard
    proxies from the driver node's agent, and it can drop while the job runs on (a busy head closes it with code
    1006): then the logs are polled from where the stream stopped, so neither output nor outcome is lost."""
    import asyncio

    client = connect(address)
    _call(lambda: client.get_job_info(job_id), "job status", job_id)
    write = out or (lambda s: print(s, end="", flush=True))
    shown = 0

    async def stream():
        nonlocal shown
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)
            shown += len(chunk)

    try:
        asyncio.run(stream())
    except Exception as err:  # noqa: BLE001 — aiohttp/RuntimeError: the stream is lost, not the job
        _warn(f"the log stream of job {job_id} dropped ({_first_line(err)}); following it by polling")
        unreachable = False
        while True:
            state = str(_call(lambda: client.get_job_status(job_id), "job status", job_id).value)
            try:
                text = client.get_job_logs(job_id)
            except Exception as fetch_err:  # noqa: BLE001 — the agent may be briefly unreachable: polls go on
                if not unreachable:
                    _warn(
                        f"the logs of job {job_id} cannot be fetched now ({_first_line(fetch_err)}); "
                        "still waiting for it to end"
                    )
                unreachable = True
            else:
                write(text[shown:])
                shown = max(shown, len(text))
            if state in TERMINAL:
                return state
            time.sleep(poll)
    return wait(job_id, address=address, timeout=60)


def wait(job_id: str, *, address: str | None = None, timeout: float = 3600, poll: float = 1.0) -> str:
    client = connect(address)
    deadline = time.monotonic() + timeout
    while True:
        state = str(_call(lambda: client.get_job_status(job_id), "job status", job_id).value)
        if state in TERMINAL:
            return state
        if time.monotonic() > deadline:
            raise JobError(f"job {job_id} still {state} after {timeout:g} s")
        time.sleep(poll)


def stop(job_id: str, *, address: str | None = None, wait_s: float = 60) -> str:
    """Ask the job to stop; wait until it is STOPPED (or otherwise finished). Returns the final status."""
    client = connect(address)
    _call(lambda: client.stop_job(job_id), "job stop", job_id)
    return wait(job_id, address=address, timeout=wait_s) if wait_s else "STOPPING"


def list_jobs(*, address: str | None = None) -> list[dict]:
    client = connect(address)
    jobs = _call(client.list_jobs, "job listing")
    return [
        {
            "job_id": j.submission_id or j.job_id,
            "status": str(getattr(j.status, "value", j.status)),
            "entrypoint": j.entrypoint,
        }
        for j in jobs
    ]


def check_finished(job_id: str, state: str, *, address: str | None = None, log_lines: int = 40) -> None:
    """Raise JobError with the tail of its logs when a job ended in FAILED."""
    if state == "FAILED":
        info = status(job_id, address=address, log_lines=log_lines)
        tail_ = info.get("logs_tail", "")
        hint = (
            (
                "\nthe cluster cannot find the t2ray command: install t2ray on its nodes (or in its image), or "
                "activate t2ray's virtual env before `ray start`"
            )
            if "t2ray: not found" in tail_
            else ""
        )
        raise JobError(f"job {job_id} FAILED: {info['message']}{hint}\n--- last {log_lines} log lines ---\n{tail_}")
    if state == "STOPPED":
        raise JobError(f"job {job_id} was STOPPED")
