"""Ray token authentication for every cluster t2ray starts or talks to (Ray ≥ 2.52: `RAY_AUTH_MODE=token`).

An unauthenticated Ray cluster runs any code that reaches its GCS or its Jobs API. t2ray therefore starts its local
clusters in token mode, with a token generated once (0600, like an SSH key) where none exists, and its clients
(`t2ray submit`, `t2ray jobs`, joining with `--address`) send the token they find. Ray reads the token, in this
order, from `$RAY_AUTH_TOKEN`, the file named by `$RAY_AUTH_TOKEN_PATH`, or `~/.ray/auth_token`.
Opt out with `RAY_AUTH_MODE=disabled` (then nothing here changes the environment).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"

HOW_TO_GIVE_A_TOKEN = (
    f"give the cluster's token by one of: `export {TOKEN_ENV}=<token>`, `export {TOKEN_PATH_ENV}=<file holding it>`, "
    "or the file ~/.ray/auth_token (`ray get-auth-token` prints it on the head)"
)


def opted_out() -> bool:
    return os.environ.get(MODE_ENV, "").strip().lower() == "disabled"


def token_path() -> Path:
    """Where Ray looks for the token file (when $RAY_AUTH_TOKEN is unset)."""
    return Path(os.environ.get(TOKEN_PATH_ENV) or Path.home() / ".ray" / "auth_token").expanduser()


def has_token() -> bool:
    if os.environ.get(TOKEN_ENV, "").strip():
        return True
    path = token_path()
    return path.is_file() and bool(path.read_text().strip())


def write_token(path: Path) -> None:
    """A new 256-bit token at `path`, created 0600 in one step (never readable by others, not even briefly)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))


def enable_token_auth(*, create: bool) -> bool:
    """Token mode for this process and the Ray processes it starts, unless the user opted out; with `create` (a local
    cluster about to start) a token is generated where none exists. Returns whether token mode is on.

    Without `create` (a client of a cluster someone else started) token mode is turned on only when a token is at
    hand: a cluster without authentication is still reachable, one with it gets the token."""
    if opted_out():
        return False
    if not has_token():
        if not create:
            return os.environ.get(MODE_ENV, "").strip().lower() == "token"
        write_token(token_path())
    # Set explicitly: Ray then also skips its console notice that it turned token mode on by itself.
    os.environ[MODE_ENV] = "token"
    refresh_ray()
    return True


def refresh_ray() -> None:
    """Ray reads the mode and the token once, when it loads (its C++ config and token loader cache them): a process
    that imported ray before we set them would start a token-mode cluster and then refuse itself. Refresh both, as
    Ray's own `_enable_token_auth` does (ray/_private/authentication/authentication_token_setup.py)."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # a Ray without token authentication (< 2.52): nothing cached
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def refused_message(what: str) -> str:
    """One line for a client the cluster refused for lack of (the right) token."""
    return f"{what} requires a Ray authentication token and refused this one or its absence; {HOW_TO_GIVE_A_TOKEN}"
