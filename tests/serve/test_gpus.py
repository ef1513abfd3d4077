"""A model replica that spans several GPUs: the config's rules, the device-map load path (on the CPU: the same split,
every part on the CPU, then accelerate's hooks), `t2ray plan --serve` against what a real ExpertLibrary holds, and
Ray placing a replica on two (fake) GPUs or refusing one that no node can hold.

Without CUDA a replica asking `device: cuda` on Ray's fake GPUs fails at once, naming the GPU ids Ray gave it; the
real split over two GPUs is `test_a_replica_split_over_two_gpus_decodes_as_on_one` (marked gpu)."""

from __future__ import annotations

import re

import pytest
import torch
import yaml

from t2ray.models.placement import gpu_device_map
from t2ray.serve.config import ServeArgs
from t2ray.serve.engine import DecodeBatch, ExpertLibrary, GenRequest, MixtureRef, replica_engine

from .conftest import tiny_args

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

EXPERTS = ("math", "code", "reasoning")


def chat(text: str, weights: dict[str, float] | None, n: int) -> GenRequest:
    ref = MixtureRef("mix", tuple(weights), tuple(weights.values())) if weights else MixtureRef()
    return GenRequest(ref, messages=[{"role": "user", "content": text}], max_tokens=n, temperature=0)


def decode(lib: ExpertLibrary, schedule: dict[int, list[GenRequest]]) -> tuple[list[list[int]], list[str]]:
    """Greedy tokens of each request, the requests of `schedule[step]` joining the running batch at that step (rows
    leave as their budgets end); and the modes the batch went through."""
    batch, step, modes = None, 0, []
    while step == 0 or not batch.done or step <= max(schedule):
        if step in schedule:
            joining = DecodeBatch(lib, [lib.prepare(r) for r in schedule[step]])
            joining.prefill()
            batch = joining if batch is None else (batch.merge(joining) or batch)
        modes.append(batch.mode)
        batch.step()
        step += 1
    return [it.generated for it in batch.items], modes


SCHEDULE = {
    0: [chat("hi", {"math": 1.0}, 8), chat("x", None, 3), chat("What is 2 + 3?", {"math": 0.4, "code": 0.6}, 6)],
    2: [chat("Write a Python function add(a, b).", {"reasoning": 1.0}, 5)],
}
HOT = {0: [chat(f"question {i}", {"code": 1.0}, 4) for i in range(3)]}  # one mixture: materialised W'


def library(paths, **kwargs) -> ExpertLibrary:
    """Room in the W' LRU for every expert: HOT's short batch is built even after SCHEDULE's (a full LRU would run it
    factored: test_a_full_lru_takes_a_new_w_prime_only_for_a_batch_that_pays_for_its_build)."""
    return ExpertLibrary(
        "tiny-llama",
        {n: str(paths[n]) for n in EXPERTS},
        dtype="float32",
        materialize_after=1,
        lru_size=len(EXPERTS),
        **kwargs,
    )


@pytest.fixture(scope="module")
def cpu_split() -> dict[str, str]:
    """The split a replica on 2 GPUs computes for tiny-llama, every part on the CPU."""
    return dict.fromkeys(gpu_device_map("tiny-llama", 2, dtype="float32"), "cpu")


# ----------------------------------------------------------------------------- config


def test_a_replica_over_several_gpus_needs_cuda_and_whole_gpus(tiny_experts):
    def with_gpus(gpus, device="cuda"):
        args = tiny_args(tiny_experts, model={"spec": "tiny-llama", "device": device})
        args["expert_model"]["ray_actor_options"] = {"num_cpus": 1, "num_gpus": gpus}
        return ServeArgs.model_validate(args)

    assert with_gpus(4).replica_gpus == 4 and with_gpus(0.5).replica_gpus == 1 and with_gpus(2.0).replica_gpus == 2
    assert with_gpus(0.5, device="cpu").replica_gpus == 1  # a share of a GPU, the model on the CPU: as before
    with pytest.raises(ValueError, match=r"expert_model.ray_actor_options.num_gpus = 2 .*needs model.device: cuda"):
        with_gpus(2, device="cpu")
    with pytest.raises(ValueError, match="needs model.device: cuda, not cuda:1"):
        with_gpus(2, device="cuda:1")
    with pytest.raises(ValueError, match=r"num_gpus = 1.5: a replica that spans GPUs takes whole ones"):
        with_gpus(1.5)
    with pytest.raises(ValueError, match="num_gpus must be a number >= 0"):
        with_gpus(-1)


# ----------------------------------------------------------------------------- the device-map load path


def test_the_split_loads_through_a_device_map_and_decodes_the_same_tokens(tiny_experts, cpu_split, torch_threads):
    """The split a 2-GPU replica makes, every part placed on the CPU: the same tokens as the model loaded whole, in
    every mode (base, z per row in a mixed batch with a row joining, materialised W' of a hot mixture)."""
    assert set(cpu_split.values()) == {"cpu"} and "model.layers.1" in cpu_split
    whole, mapped = library(tiny_experts), library(tiny_experts, device_map=cpu_split)
    for schedule in (SCHEDULE, HOT):
        expected, modes = decode(whole, schedule)
        assert decode(mapped, schedule) == (expected, modes)
        assert ("factored" in modes) if schedule is SCHEDULE else (set(modes) == {"materialized"})


@pytest.mark.parametrize("kind", ["svf", "lora"])
def test_under_accelerates_hooks_the_hf_decoder_gives_the_same_tokens(
    kind, tiny_experts, lora_library, cpu_split, torch_threads, monkeypatch
):
    """A model split over GPUs runs under accelerate's hooks (they move each layer's inputs to its device) and decodes
    through Hugging Face's forward: the same hooks on the CPU, rows joining and leaving, give the KV decoder's
    tokens."""
    from accelerate import dispatch_model

    paths = tiny_experts if kind == "svf" else lora_library
    expected, _ = decode(library(paths), SCHEDULE)
    hooked = library(paths, device_map=cpu_split)
    dispatch_model(hooked.model, device_map=cpu_split, force_hooks=True)
    assert hasattr(hooked.model.model.layers[0], "_hf_hook")
    monkeypatch.setenv("T2RAY_DECODE", "hf")
    assert decode(hooked, SCHEDULE)[0] == expected


def test_cuda_that_torch_cannot_see_is_named_with_the_gpu_ids():
    engine = {"model_spec": "tiny-llama", "device": "cuda", "dtype": "float32", "seed": 0}
    assert replica_engine({**engine, "device": "cpu"}, [0, 1]) == {**engine, "device": "cpu"}
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs")
    with pytest.raises(RuntimeError, match=r"GPU ids \[0, 1\] .*but torch sees \d CUDA device"):
        replica_engine(engine, [0, 1])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_a_replica_split_over_two_gpus_decodes_as_on_one(tiny_experts):
    engine = {"model_spec": "tiny-llama", "experts": {n: str(tiny_experts[n]) for n in EXPERTS}}
    engine.update(device="cuda", dtype="float32", seed=0, materialize_after=1)
    split = ExpertLibrary(**replica_engine(engine, [0, 1]))
    assert {p.device.index for p in split.model.parameters()} == {0, 1}
    one = ExpertLibrary(**engine)
    for schedule in (SCHEDULE, HOT):
        assert decode(split, schedule)[0] == decode(one, schedule)[0]


# ----------------------------------------------------------------------------- the plan against the real replica


def held_bytes(lib: ExpertLibrary) -> dict[str, int]:
    """What a real ExpertLibrary holds: weights, SVF factors or LoRA adapters, the W' copies its LRU keeps."""

    def size(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    adapter = ("svf_q", "svf_p", ".s", "lora_A", "lora_B", "column_expert", "column_scale")
    named = dict(lib.model.named_parameters()) | dict(lib.model.named_buffers())
    kept = [w for entry in lib._weights.values() for _, (_, w) in entry.values()]
    return {
        "weights": size(t for n, t in named.items() if not n.endswith(adapter)),
        "adapters": size(t for n, t in named.items() if n.endswith(adapter)),
        "w_prime": size(kept),
    }


@pytest.mark.parametrize("kind", ["svf", "lora"])
def test_the_serve_plan_counts_what_a_real_replica_holds(kind, tiny_experts, lora_library, torch_threads):
    from t2ray.plan import GIB
    from t2ray.serve.app import plan as engine_plan
    from t2ray.serve.capacity import plan_replica

    paths = tiny_experts if kind == "svf" else lora_library
    args = tiny_args(paths, model={"spec": "tiny-llama", "dtype": "float32"}, mixtures={})  # and the cls expert
    args["batching"].update(mode="auto", lru_size=2, materialize_after=1)
    cfg = ServeArgs.model_validate(args).resolved()
    planned = plan_replica("t2ray", cfg, 80)
    engine, _ = engine_plan(cfg)
    lib = ExpertLibrary(**engine)
    for mixture in ({"math": 1.0}, {"code": 1.0}, {"math": 0.5, "reasoning": 0.5}):  # three hot mixtures, LRU of 2
        decode(lib, {0: [chat("hi", mixture, 2)]})
    held = held_bytes(lib)
    rows = {k: round(v * GIB) for k, v in planned.plan.rows.items()}
    assert rows["frozen weights (float32)"] == held["weights"]
    if kind == "svf":
        assert planned.experts == "4 SVF experts on 6 matrices" and len(lib._weights) == 2
        assert rows["SVF factors (Q per adapted matrix)"] == held["adapters"]
        assert rows["materialised W' (2 copies, mode auto)"] == held["w_prime"]
    else:
        assert planned.experts == "4 LoRA adapters" and held["w_prime"] == 0  # LoRA never materialises
        assert rows["LoRA adapters (A, B of each)"] == held["adapters"]


# ----------------------------------------------------------------------------- Ray: two fake GPUs


@pytest.fixture(scope="module")
def two_gpu_cluster(free_port):
    """A local Ray cluster declaring 2 GPUs (torch sees none: Ray's GPU count is bookkeeping), Serve on a free port."""
    ray.init(address="local", num_cpus=2, num_gpus=2, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def gpu_config(tiny_experts, gpus: int, port: int) -> dict:
    args = tiny_args(tiny_experts, model={"spec": "tiny-llama", "device": "cuda"})
    args["expert_model"]["ray_actor_options"] = {"num_cpus": 0.5, "num_gpus": gpus}
    app = {"name": "gpus", "route_prefix": "/gpus", "import_path": "t2ray.serve.app:build_app", "args": args}
    return {"http_options": {"host": "127.0.0.1", "port": port}, "applications": [app]}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_places_a_replica_on_two_gpus_and_it_names_them(two_gpu_cluster, tiny_experts):
    """Serve starts the replica with both GPUs reserved for it (Ray gives it ids 0 and 1); torch has no CUDA here,
    so its constructor fails at once naming them, and the deployment fails instead of hanging."""
    from t2ray.serve.app import build_app

    args = gpu_config(tiny_experts, 2, two_gpu_cluster)["applications"][0]["args"]
    try:
        with pytest.raises(RuntimeError, match="Deploying application gpus failed"):
            serve.run(build_app(args), name="gpus", route_prefix="/gpus")
        status = serve.status().applications["gpus"].deployments["ExpertModel"]
        assert status.status == "DEPLOY_FAILED"
        assert re.search(r"Ray gave this replica GPU ids \[0, 1\] .*but torch sees 0 CUDA device", status.message)
    finally:
        serve.delete("gpus")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_replica_no_node_can_hold_is_refused_before_deploying(two_gpu_cluster, tiny_experts, tmp_path):
    from t2ray.serve.app import run_config

    path = tmp_path / "four.yaml"
    path.write_text(yaml.safe_dump(gpu_config(tiny_experts, 4, two_gpu_cluster)))
    with pytest.raises(ValueError, match=r"gpus: expert_model: .*num_gpus = 4, but no node .* has 4 GPU .*: 2\)"):
        run_config(path, blocking=False)
    assert "gpus" not in serve.status().applications  # nothing was deployed


def test_resources_no_node_has_together_are_named():
    from t2ray.serve.app import unplaceable

    nodes = [{"CPU": 16, "GPU": 0}, {"CPU": 2, "GPU": 8}]
    assert unplaceable("expert_model", {"CPU": 2, "GPU": 8}, nodes) is None
    assert "has all of these at once" in unplaceable("expert_model", {"CPU": 4, "GPU": 4}, nodes)
    assert "resources.TPU" in unplaceable("expert_model", {"TPU": 1}, nodes)
