"""Token authentication on by default: what t2ray.ray_auth does to the environment before a cluster starts or a
client connects (the clusters themselves refusing outsiders: tests/test_jobs.py)."""

import os
import stat

import pytest
from ray_env import env_var  # tests/ray_env.py

from t2ray import ray_auth


@pytest.fixture
def no_auth_settings(tmp_path, monkeypatch):
    """A user with no token anywhere and no RAY_AUTH_* set; returns where Ray would look for the token file."""
    for name in (ray_auth.MODE_ENV, ray_auth.TOKEN_ENV, ray_auth.TOKEN_PATH_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    yield tmp_path / ".ray" / "auth_token"
    monkeypatch.undo()
    ray_auth.refresh_ray()  # Ray caches the mode and token: back to the session's for the tests that follow


def test_a_local_cluster_gets_token_mode_and_a_private_token(no_auth_settings):
    assert ray_auth.enable_token_auth(create=True)
    assert os.environ[ray_auth.MODE_ENV] == "token"
    assert len(no_auth_settings.read_text()) == 64  # 256 bits, hex
    assert stat.S_IMODE(no_auth_settings.stat().st_mode) == 0o600
    assert stat.S_IMODE(no_auth_settings.parent.stat().st_mode) == 0o700
    first = no_auth_settings.read_text()
    assert ray_auth.enable_token_auth(create=True) and no_auth_settings.read_text() == first  # generated once


def test_an_existing_token_is_used_where_ray_looks_for_it(no_auth_settings, tmp_path):
    elsewhere = tmp_path / "cluster-token"
    elsewhere.write_text("abc123")
    with env_var(ray_auth.TOKEN_PATH_ENV, str(elsewhere)):
        assert ray_auth.enable_token_auth(create=True)
    assert not no_auth_settings.exists() and elsewhere.read_text() == "abc123"
    os.environ.pop(ray_auth.MODE_ENV)
    with env_var(ray_auth.TOKEN_ENV, "from-the-environment"):
        assert ray_auth.enable_token_auth(create=True)
    assert not no_auth_settings.exists()


def test_a_client_without_a_token_stays_as_it_is(no_auth_settings):
    assert not ray_auth.enable_token_auth(create=False)  # a cluster without authentication stays reachable
    assert ray_auth.MODE_ENV not in os.environ and not no_auth_settings.exists()


def test_the_opt_out_is_respected(no_auth_settings):
    with env_var(ray_auth.MODE_ENV, "disabled"):
        assert not ray_auth.enable_token_auth(create=True)
        assert os.environ[ray_auth.MODE_ENV] == "disabled" and not no_auth_settings.exists()


def test_the_refusal_names_the_three_ways_to_give_a_token():
    line = ray_auth.refused_message("the Ray cluster at http://head:8265")
    assert "\n" not in line and "RAY_AUTH_TOKEN=" in line and "RAY_AUTH_TOKEN_PATH=" in line
    assert "~/.ray/auth_token" in line
