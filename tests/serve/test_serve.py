"""Real Ray Serve on a module-scoped local Ray cluster (2 CPUs): the official `openai` client against the
endpoint, every pass-1 strategy, the bad-input suite, 200 requests at concurrency 16, a replica killed under
load, and `serve run` of a config file.

One application for the module: tiny-llama with tiny experts, two ExpertModel replicas, a bearer token.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from ray_env import env_var  # tests/ray_env.py

from .conftest import run_load, tiny_args

openai = pytest.importorskip("openai")
ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

KEY = "t2ray-test-key"
URL = "http://127.0.0.1:8000"
APP = "t2ray"
SHIPPED = Path(__file__).resolve().parents[2] / "experiments" / "serve-smollm2.yaml"
CHAT = [{"role": "user", "content": "What is 12 + 7?"}]


@pytest.fixture(scope="module")
def endpoint(tiny_experts):
    """Ray (2 CPUs) + Serve on 127.0.0.1:8000 + the t2ray app; torn down after the module."""
    from t2ray.serve.app import build_app

    with env_var("T2RAY_API_KEY", KEY):  # inherited by the Ray workers started below
        ray.init(address="local", num_cpus=2, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": 8000})
            args = tiny_args(
                tiny_experts,
                # long requests for test_a_request_joins_the_running_batch
                generation={"max_tokens_default": 8, "max_tokens_limit": 256},
                expert_model={
                    "num_replicas": 2,
                    "ray_actor_options": {"num_cpus": 0.5},
                    "max_ongoing_requests": 64,
                    "health_check_period_s": 2,
                    "health_check_timeout_s": 30,
                },
            )
            serve.run(build_app(args), name=APP, route_prefix="/")
            yield URL
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()


@pytest.fixture(scope="module")
def client(endpoint):
    return openai.OpenAI(base_url=f"{endpoint}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(endpoint):
    with httpx.Client(base_url=endpoint, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


# ----------------------------------------------------------------------------- the openai client


def test_models_list(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["auto", "base", "math", "code", "reasoning", "math-code", "math-reasoning"]


def test_chat_completion(client):
    resp = client.chat.completions.create(model="math", messages=CHAT, max_tokens=5, temperature=0)
    assert resp.object == "chat.completion" and isinstance(resp.choices[0].message.content, str)
    assert resp.choices[0].finish_reason in ("stop", "length") and 1 <= resp.usage.completion_tokens <= 5
    report = resp.model_extra["t2ray"]
    assert report["mixture"] == {"label": "expert:math", "weights": {"math": 1.0}}
    assert report["timings"]["pass2_ms"] > 0 and report["timings"]["pass1_ms"] >= 0


def test_completion(client):
    resp = client.completions.create(model="base", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert resp.object == "text_completion" and resp.usage.completion_tokens <= 5
    assert resp.model_extra["t2ray"]["mixture"]["label"] == "base"
    many = client.completions.create(model="code", prompt=["a", "b c"], max_tokens=3)
    assert [c.index for c in many.choices] == [0, 1]


def test_a_repeated_prompt_start_comes_from_the_prefix_cache(client):
    """The chat template's start, kept from an earlier request of the same weights, is not prefilled again (OpenAI's
    usage.prompt_tokens_details.cached_tokens says how many tokens), and the answers are the same. Each of the 2
    replicas keeps its own: of 4 requests, only the first that each replica gets can miss."""
    answers = [
        client.chat.completions.create(model="base", messages=CHAT, max_tokens=4, temperature=0) for _ in range(4)
    ]
    cached = [a.usage.prompt_tokens_details.cached_tokens for a in answers]
    assert sum(c > 0 for c in cached) >= 2, cached
    assert all(c % 16 == 0 and c < a.usage.prompt_tokens for c, a in zip(cached, answers, strict=True))
    assert len({a.choices[0].message.content for a in answers}) == 1


def test_streaming_chat_equals_the_whole_answer(client):
    whole = client.chat.completions.create(model="code", messages=CHAT, max_tokens=8, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="code",
            messages=CHAT,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].model_extra["t2ray"]["mixture"]["label"] == "expert:code"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_streaming_completion(client):
    chunks = list(client.completions.create(model="math-code", prompt="Hello", max_tokens=6, stream=True))
    assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].model_extra["t2ray"]["mixture"]["weights"] == {"math": 0.5, "code": 0.5}


# ----------------------------------------------------------------------------- pass 1 strategies


def test_auto_prompt_dispatch_reports_pass1(client):
    resp = client.chat.completions.create(model="auto", messages=CHAT, max_tokens=3)
    report = resp.model_extra["t2ray"]
    assert report["strategy"] == "prompt" and report["category"] in ("code", "math", "reasoning", "other")
    expected = "base" if report["category"] == "other" else f"expert:{report['category']}"
    assert report["mixture"]["label"] == expected and report["timings"]["pass1_ms"] > 0


def test_nearest_centroid_dispatch_sends_each_question_to_its_tasks_expert(client):
    """Pass 1 by the nearest centroid of each expert's training questions (sentence embeddings): a word problem goes
    to the math expert, a function to write to the code expert; the choice is reported with its pass-1 time."""
    for question, expert in (
        ("Tom has 3 apples and buys 4 more. How many apples does he have now?", "math"),
        ("Write a Python function `double(x)` that returns twice x.", "code"),
    ):
        resp = client.chat.completions.create(
            model="auto",
            messages=[{"role": "user", "content": question}],
            max_tokens=3,
            extra_body={"t2ray": {"strategy": "nearest"}},
        )
        report = resp.model_extra["t2ray"]
        assert report["strategy"] == "nearest" and report["expert"] == expert, report
        assert report["mixture"]["label"] == f"expert:{expert}" and report["timings"]["pass1_ms"] > 0


def test_classifier_saved_mixture_and_explicit_choices(client):
    resp = client.chat.completions.create(
        model="auto", messages=CHAT, max_tokens=3, extra_body={"t2ray": {"strategy": "classifier"}}
    )
    assert resp.model_extra["t2ray"]["strategy"] == "classifier"
    resp = client.chat.completions.create(model="math-reasoning", messages=CHAT, max_tokens=3)
    assert resp.model_extra["t2ray"]["mixture"]["weights"] == {"math": 0.6, "reasoning": 0.4}
    resp = client.chat.completions.create(
        model="auto", messages=CHAT, max_tokens=3, extra_body={"t2ray": {"expert": "reasoning"}}
    )
    assert resp.model_extra["t2ray"]["mixture"]["label"] == "expert:reasoning"
    resp = client.chat.completions.create(
        model="auto", messages=CHAT, max_tokens=3, extra_body={"t2ray": {"weights": [0, 2, 1]}}
    )
    assert resp.model_extra["t2ray"]["mixture"]["weights"] == {"code": 2.0, "reasoning": 1.0}


def test_token_level_strategy(client):
    from t2ray.serve.app import token_routing_available

    body = {"t2ray": {"strategy": "token"}}
    if token_routing_available() is not None:
        with pytest.raises(openai.BadRequestError, match="not available"):
            client.chat.completions.create(model="auto", messages=CHAT, max_tokens=3, extra_body=body)
        return
    resp = client.chat.completions.create(model="auto", messages=CHAT, max_tokens=4, extra_body=body)
    mixture = resp.model_extra["t2ray"]["mixture"]
    assert mixture["label"] == "token-routed" and set(mixture["weights"]) == {"math", "code", "reasoning"}
    assert abs(sum(mixture["weights"].values()) - 1) < 1e-4


# ----------------------------------------------------------------------------- bad input

LONG = "word " * 1200  # tiny-llama's context is 1024 tokens
OK = {"model": "auto", "messages": CHAT, "max_tokens": 2}


@pytest.mark.parametrize(
    "path, body, status, fragment",
    [
        ("/v1/chat/completions", b"{not json", 400, "parse the JSON"),
        ("/v1/chat/completions", b"[1, 2]", 400, "JSON object"),
        ("/v1/chat/completions", {"messages": CHAT}, 400, "model"),
        ("/v1/chat/completions", {"model": "auto"}, 400, "messages"),
        ("/v1/chat/completions", {"model": "auto", "messages": "hi"}, 400, "messages"),
        ("/v1/chat/completions", {**OK, "max_tokens": "two"}, 400, "max_tokens"),
        ("/v1/chat/completions", {**OK, "temperature": 9}, 400, "temperature"),
        ("/v1/chat/completions", {**OK, "messages": []}, 400, "at least one message"),
        ("/v1/chat/completions", {**OK, "model": "gpt-4"}, 404, "valid models: auto, base, math"),
        ("/v1/chat/completions", {**OK, "t2ray": {"expert": "physics"}}, 404, "valid experts: math"),
        ("/v1/chat/completions", {**OK, "t2ray": {"weights": {"physics": 1}}}, 404, "unknown expert 'physics'"),
        ("/v1/chat/completions", {**OK, "t2ray": {"weights": [1, -1, 0]}}, 400, ">= 0"),
        ("/v1/chat/completions", {**OK, "t2ray": {"weights": [0, 0, 0]}}, 400, "all zero"),
        ("/v1/chat/completions", {**OK, "t2ray": {"weights": [1, 1]}}, 400, "3 experts"),
        (
            "/v1/chat/completions",
            b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "t2ray": {"weights": [NaN, 1, 1]}}',
            400,
            "NaN",
        ),
        ("/v1/chat/completions", {**OK, "t2ray": {"strategy": "psychic"}}, 400, "t2ray.strategy"),
        ("/v1/chat/completions", {**OK, "max_tokens": 257}, 400, "at most 256"),
        (
            "/v1/chat/completions",
            {**OK, "messages": [{"role": "user", "content": LONG}], "model": "base"},
            400,
            "context",
        ),
        (
            "/v1/chat/completions",
            {**OK, "messages": [{"role": "user", "content": LONG}], "stream": True},
            400,
            "context",
        ),
        ("/v1/completions", {"model": "math", "prompt": LONG, "max_tokens": 2}, 400, "context"),
        ("/v1/completions", {"model": "math", "prompt": [], "max_tokens": 2}, 400, "prompt"),
        ("/v1/embeddings", {"model": "math", "input": "x"}, 404, "Not Found"),
        (
            "/v1/chat/completions",
            {**OK, "tools": [{"type": "function", "function": {"name": "f"}}]},
            400,
            "tools is not supported",
        ),
        ("/v1/chat/completions", {**OK, "response_format": {"type": "json_object"}}, 400, "response_format"),
        ("/v1/chat/completions", {**OK, "logprobs": True}, 400, "logprobs is not supported"),
        ("/v1/chat/completions", {**OK, "seed": 2**64}, 400, "seed"),
        (
            "/v1/chat/completions",
            b'{"model": "auto", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
            400,
            "surrogate",
        ),
        ("/v1/chat/completions", {**OK, "messages": [{"role": "user", "content": "x" * (1 << 20)}]}, 413, "exceeds"),
    ],
)
def test_bad_input_is_a_4xx_in_openai_shape(http, path, body, status, fragment):
    kwargs = (
        {"content": body, "headers": {"Content-Type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    resp = http.post(path, **kwargs)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and fragment in error["message"], error


def test_wrong_or_missing_token_is_401(endpoint, client):
    for headers in ({"Authorization": "Bearer nope"}, {}):
        resp = httpx.post(f"{endpoint}/v1/chat/completions", json=OK, headers=headers, timeout=60)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{endpoint}/v1", api_key="nope", max_retries=0).models.list()


def test_still_serving_after_bad_input(http, client):
    assert httpx.get(f"{URL}/healthz").json() == {"status": "ok"}  # no key, and no model ids or paths told
    assert client.chat.completions.create(model="base", messages=CHAT, max_tokens=2).choices
    tiny = client.chat.completions.create(model="base", messages=CHAT, max_tokens=4, temperature=1e-38, seed=3)
    greedy = client.chat.completions.create(model="base", messages=CHAT, max_tokens=4, temperature=0)
    assert tiny.choices[0].message.content == greedy.choices[0].message.content  # greedy, not NaN


# ----------------------------------------------------------------------------- load and recovery


def replica_stats(seconds: float = 2.0) -> dict[int, dict]:
    """Latest stats of each ExpertModel replica seen by pinging for `seconds` (pings land on random replicas)."""
    handle = serve.get_deployment_handle("ExpertModel", app_name=APP)
    seen, deadline = {}, time.monotonic() + seconds
    while time.monotonic() < deadline:
        info = handle.ping.remote().result()
        seen[info["pid"]] = info["stats"]
    return seen


def test_fifty_dropped_streams_stop_decoding(endpoint):
    """Clients that hang up after the first chunk: their rows leave the batch instead of generating to max_tokens."""
    cancelled_before = sum(s["cancelled_rows"] for s in replica_stats(1.0).values())

    async def open_then_drop(client, i):
        body = {"model": "base", "prompt": f"Story number {i}:", "max_tokens": 64, "stream": True, "ignore_eos": True}
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data:"):
                    return  # hang up

    async def drop_all():
        async with httpx.AsyncClient(
            base_url=endpoint, headers={"Authorization": f"Bearer {KEY}"}, timeout=120
        ) as client:
            await asyncio.gather(*(open_then_drop(client, i) for i in range(50)))

    asyncio.run(drop_all())
    dropped = time.monotonic()
    idle = None
    while time.monotonic() - dropped < 10:
        stats = replica_stats(0.5)
        if all(s["decoding_rows"] == 0 for s in stats.values()):
            idle = time.monotonic() - dropped
            break
    assert idle is not None and idle < 2.0, idle
    assert sum(s["cancelled_rows"] for s in replica_stats(1.0).values()) > cancelled_before


def test_a_request_joins_the_running_batch(endpoint):
    """Continuous batching through HTTP: requests sent while 16 long ones decode do not wait for them to end — they
    decode beside them (mean batch > 1) and finish first."""

    async def scenario():
        async with httpx.AsyncClient(
            base_url=endpoint, headers={"Authorization": f"Bearer {KEY}"}, timeout=120
        ) as client:
            long = [
                asyncio.create_task(
                    client.post(
                        "/v1/completions",
                        # 256 tokens: room for the short ones to join and finish on a loaded machine (at 64 the
                        # long ones once ended first, in a full suite run)
                        json={"model": "base", "prompt": f"Count {i}:", "max_tokens": 256, "ignore_eos": True},
                    )
                )
                for i in range(16)
            ]
            await asyncio.sleep(0.3)  # they are decoding now
            short = await asyncio.gather(
                *(
                    client.post(
                        "/v1/chat/completions",
                        json={"model": "math", "messages": CHAT, "max_tokens": 4, "ignore_eos": True},
                    )
                    for _ in range(2)
                )
            )
            still_running = sum(not task.done() for task in long)
            return short, still_running, await asyncio.gather(*long)

    short, still_running, long = asyncio.run(scenario())
    assert all(r.status_code == 200 for r in [*short, *long])
    assert all(r.json()["t2ray"]["batch_size"] > 1 and r.json()["usage"]["completion_tokens"] == 4 for r in short)
    assert still_running > 0, "the short requests waited for the long ones to end"


def test_200_requests_at_concurrency_16_each_with_its_mixture(endpoint):
    start = time.perf_counter()
    results = asyncio.run(run_load(URL, KEY, 200, 16))
    elapsed = time.perf_counter() - start
    errors = [(s, b) for _, s, b in results if s != 200]
    assert not errors, errors[:3]
    for plan, _, body in results:
        assert body["t2ray"]["mixture"]["weights"] == plan
    sizes = [body["t2ray"]["batch_size"] for _, _, body in results]
    assert max(sizes) > 1, "requests with different mixtures were never batched together"
    print(f"200 requests in {elapsed:.1f} s, batch sizes up to {max(sizes)}")


def _expert_replicas() -> list:
    from ray.util.state import list_actors

    return list_actors(
        address=ray.get_runtime_context().gcs_address,  # other Ray clusters may run on this host
        filters=[("class_name", "=", f"ServeReplica:{APP}:ExpertModel"), ("state", "=", "ALIVE")],
    )


def _wait_running(replicas: int, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        app = serve.status().applications.get(APP)
        if app is not None and app.status == "RUNNING":
            counts = app.deployments["ExpertModel"].replica_states
            if counts.get("RUNNING", 0) >= replicas:
                return
        time.sleep(1)
    raise AssertionError(f"ExpertModel did not get back to {replicas} running replicas: {serve.status()}")


def test_replica_killed_under_load_recovers(endpoint, http):
    victims = _expert_replicas()
    assert len(victims) == 2
    victim = victims[0]
    killed = {}

    async def kill_once(done: int):
        if done == 30 and not killed:
            handle = ray.get_actor(victim.name, namespace=victim.ray_namespace)
            await asyncio.to_thread(ray.kill, handle, no_restart=True)
            killed["at"] = time.time()

    results = asyncio.run(run_load(URL, KEY, 200, 16, on_done=kill_once))
    failed = [(s, b) for _, s, b in results if s != 200]
    assert killed, "the replica was never killed"
    assert len(failed) <= 2, failed  # ≤ 1 % of 200
    print(f"replica killed after 30 of 200 requests: {len(failed)} failed")
    _wait_running(2)
    assert victim.actor_id not in {a.actor_id for a in _expert_replicas()}  # a new replica replaced it
    assert http.get("/healthz").status_code == 200
    assert http.post("/v1/chat/completions", json={**OK, "model": "math"}).status_code == 200


# ----------------------------------------------------------------------------- config files


def tiny_config(tiny_experts, name: str, prefix: str) -> dict:
    """The shipped config, pointed at tiny-llama and the tiny experts, as another application."""
    config = yaml.safe_load(SHIPPED.read_text())
    app = config["applications"][0]
    app.update(name=name, route_prefix=prefix)
    args = tiny_args(tiny_experts)
    app["args"].update(
        model=args["model"],
        experts=args["experts"],
        classifier_expert=args["classifier_expert"],
        generation=args["generation"],
        batching=args["batching"],
    )
    app["args"]["expert_model"].update(ray_actor_options={"num_cpus": 0.25})
    return config


def test_serve_run_of_a_config_file(endpoint, tiny_experts, tmp_path):
    """Ray's own `serve run` CLI deploys the (tiny variant of the) shipped config next to the running app."""
    path = tmp_path / "serve-tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tiny_experts, "cfg", "/cfg"), sort_keys=False))
    serve_cli = Path(sys.executable).with_name("serve")
    done = subprocess.run(
        [str(serve_cli), "run", "--non-blocking", "--address", ray.get_runtime_context().gcs_address, str(path)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr[-2000:]
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            status = serve.status().applications.get("cfg")
            if status is not None and status.status in ("RUNNING", "DEPLOY_FAILED"):
                break
            time.sleep(1)
        assert status is not None and status.status == "RUNNING", status
        client = openai.OpenAI(base_url=f"{URL}/cfg/v1", api_key=KEY, max_retries=0, timeout=120)
        assert "math-code" in [m.id for m in client.models.list().data]
        resp = client.chat.completions.create(model="auto", messages=CHAT, max_tokens=3)
        assert resp.model_extra["t2ray"]["strategy"] == "nearest"  # the shipped file's auto.strategy
    finally:
        serve.delete("cfg")


def test_t2ray_serve_run_config(endpoint, tiny_experts, tmp_path):
    """`t2ray serve CONFIG`'s code path (non-blocking, joining the running Ray/Serve)."""
    from t2ray.serve.app import run_config

    path = tmp_path / "serve-cli.yaml"
    config = tiny_config(tiny_experts, "cli", "/cli")
    config["applications"][0]["deployments"] = [{"name": "ExpertModel", "max_ongoing_requests": 32}]
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    try:
        info = run_config(path, blocking=False)
        assert info["openai_base_url"] == {"cli": f"{URL}/cli/v1"} and "T2RAY_API_KEY" in info["auth"]
        client = openai.OpenAI(base_url=info["openai_base_url"]["cli"], api_key=KEY, max_retries=0, timeout=120)
        resp = client.completions.create(model="reasoning", prompt="Why?", max_tokens=3)
        assert resp.model_extra["t2ray"]["mixture"]["label"] == "expert:reasoning"
    finally:
        serve.delete("cli")


def test_lora_experts_are_served_like_svf_experts(endpoint, lora_library, tmp_path):
    """A server whose experts are LoRA adapter folders: model names, a mixture file over folders, `auto` with the
    prompt / classifier / token strategies, explicit weights, and a different adapter mixture per row in a batch."""
    from t2ray.experts import Mixture, save_mixture
    from t2ray.serve.app import build_app

    mixture = save_mixture(
        Mixture(experts=[str(lora_library["math"]), str(lora_library["code"])], alpha=[0.7, 0.3], name="math-code"),
        tmp_path / "lora-math-code.json",
    )
    args = tiny_args(
        lora_library,
        mixtures={"math-code": {"file": str(mixture)}},
        expert_model={"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}, "max_ongoing_requests": 64},
    )
    serve.run(build_app(args), name="lora", route_prefix="/lora")
    try:
        client = openai.OpenAI(base_url=f"{URL}/lora/v1", api_key=KEY, max_retries=0, timeout=120)
        assert {"math", "code", "reasoning", "math-code"} <= {m.id for m in client.models.list().data}
        answers = {}
        for model, t2ray in [
            ("math", {}),
            ("math-code", {}),
            ("auto", {}),
            ("auto", {"strategy": "classifier"}),
            ("auto", {"weights": [0, 2, 1]}),
            ("auto", {"strategy": "token"}),
        ]:
            resp = client.chat.completions.create(
                model=model, messages=CHAT, max_tokens=4, temperature=0, extra_body={"t2ray": t2ray}
            )
            answers[model, str(t2ray)] = resp.model_extra["t2ray"]
        assert answers["math", "{}"]["mixture"] == {"label": "expert:math", "weights": {"math": 1.0}}
        assert answers["math-code", "{}"]["mixture"]["weights"] == {"math": 0.7, "code": 0.3}
        assert answers["auto", "{'strategy': 'classifier'}"]["strategy"] == "classifier"
        assert answers["auto", "{'weights': [0, 2, 1]}"]["mixture"]["weights"] == {"code": 2.0, "reasoning": 1.0}
        routed = answers["auto", "{'strategy': 'token'}"]["mixture"]
        assert routed["label"] == "token-routed" and abs(sum(routed["weights"].values()) - 1) < 1e-4
        results = asyncio.run(run_load(f"{URL}/lora", KEY, 24, 8))
        assert all(status == 200 and body["t2ray"]["mixture"]["weights"] == plan for plan, status, body in results)
        assert max(body["t2ray"]["batch_size"] for _, _, body in results) > 1  # mixtures differ within a batch
    finally:
        serve.delete("lora")


def test_a_full_replica_queue_answers_503_in_openai_shape(endpoint, tiny_experts):
    """Backpressure: a replica that takes 2 requests at a time and queues 1 more turns the rest away at once."""
    from t2ray.serve.app import build_app

    args = tiny_args(
        tiny_experts,
        batching={"max_batch_size": 1, "batch_wait_timeout_s": 0.0, "torch_threads": 1},
        expert_model={
            "num_replicas": 1,
            "ray_actor_options": {"num_cpus": 0.25},
            "max_ongoing_requests": 2,
            "max_queued_requests": 1,
        },
    )
    serve.run(build_app(args), name="tight", route_prefix="/tight")
    try:

        async def flood():
            async with httpx.AsyncClient(
                base_url=f"{URL}/tight", headers={"Authorization": f"Bearer {KEY}"}, timeout=120
            ) as client:
                body = {"model": "base", "prompt": "Count:", "max_tokens": 48, "ignore_eos": True}
                return await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(24)))

        responses = asyncio.run(flood())
        statuses = [r.status_code for r in responses]
        turned_away = [r.json()["error"] for r in responses if r.status_code == 503]
        assert turned_away and 200 in statuses and set(statuses) <= {200, 503}, statuses
        assert all(e["code"] == "server_overloaded" and e["type"] == "server_error" for e in turned_away)
    finally:
        serve.delete("tight")
