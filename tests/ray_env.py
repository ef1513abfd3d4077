"""The environment of the local Ray clusters the tests start (imported by tests/train and tests/multinode)."""

# Before a cluster starts: Ray's processes (the Train controller, the workers) inherit this environment.
RUN_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_AUTH_MODE": "disabled",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "DS_ACCELERATOR": "cpu",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",  # report() waits on the controller's poll (SPEC §4)
}


# Our clusters run without a dashboard, hence without a State API. Ray Train V2's PlacementGroupCleaner polls the
# State API for the controller; with no address it auto-detects a Ray instance, and on a machine where other
# users run their own clusters it can reach one of theirs, not find our controller there, declare it dead and
# remove our placement group mid-run ("A worker health check failed ... Destroying worker since its placement
# group was removed"; Ray's is_actor_alive treats a missing State API result as dead). Pointing the State API at
# a closed local port makes every query fail (ServerUnavailable), which the cleaner skips: it then stays idle,
# as it should while our controller is alive.
NO_STATE_API = "http://127.0.0.1:1"
