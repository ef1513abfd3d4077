"""`decompose_distributed`: the SVDs as Ray tasks fill the same per-matrix cache a local run reads."""
from __future__ import annotations

import importlib

import pytest
import torch

from t2ray.svf import model_fingerprint, select_targets
from t2ray.svf.decompose import svd_cache_dir, svd_factors
from t2ray.train.decompose import decompose_distributed, missing_targets

# the module, not the function the package re-exports under the same name
decompose_mod = importlib.import_module("t2ray.svf.decompose")

pytestmark = pytest.mark.slow


def test_two_ray_tasks_fill_the_cache_a_local_decompose_hits(ray_cluster, tiny, tmp_path, monkeypatch, torch_threads):
    monkeypatch.setenv("T2RAY_CACHE", str(tmp_path / "cache"))  # an empty cache (svd_cache_dir reads it)
    fingerprint = model_fingerprint(tiny)
    targets = select_targets(tiny, "all")
    folder = svd_cache_dir(fingerprint, torch.float32)
    assert folder.is_relative_to(tmp_path / "cache")
    assert not folder.exists()

    summary = decompose_distributed(tiny, "all", None, fingerprint=fingerprint, workers=2)
    assert summary == {"matrices": 14, "computed": 14, "cache": str(folder)}
    assert sorted(p.stem for p in folder.glob("*.safetensors")) == sorted(targets)
    assert not list(folder.glob("*.tmp*"))  # atomic writes only

    # a local decompose is now a pure cache hit: it never computes an SVD, and returns the stored tensors
    def no_svd(*args, **kwargs):
        raise AssertionError("local decompose recomputed an SVD instead of reading the cache")

    monkeypatch.setattr(decompose_mod, "svd_factors", no_svd)
    cached = decompose_mod.decompose(tiny, targets, fingerprint=fingerprint, progress=False)
    monkeypatch.undo()
    monkeypatch.setenv("T2RAY_CACHE", str(tmp_path / "cache"))

    modules = dict(tiny.named_modules())
    for name in targets:
        local = svd_factors(modules[name].weight)  # what a local run would have computed
        assert cached[name].q.shape == local.q.shape and cached[name].s.shape == local.s.shape
        # same LAPACK call on the same weights (1 thread here, as in the 1-CPU Ray task)
        torch.testing.assert_close(cached[name].s, local.s, rtol=0, atol=1e-6, msg=name)
        torch.testing.assert_close(cached[name].q, local.q, rtol=0, atol=1e-5, msg=name)

    # and a second distributed run has nothing to do
    again = decompose_distributed(tiny, "all", None, fingerprint=fingerprint, workers=2)
    assert again["computed"] == 0


def test_distributed_resumes_matrix_by_matrix(ray_cluster, tiny, tmp_path, monkeypatch):
    """An interrupted run left some matrices: only the missing ones are computed."""
    monkeypatch.setenv("T2RAY_CACHE", str(tmp_path / "cache"))
    fingerprint = model_fingerprint(tiny)
    mlp = select_targets(tiny, "mlp")
    decompose_mod.decompose(tiny, mlp[:2], fingerprint=fingerprint, progress=False)  # a partial local run
    summary = decompose_distributed(tiny, "mlp", None, fingerprint=fingerprint, workers=2)
    assert summary["matrices"] == 6 and summary["computed"] == 4
    assert missing_targets(tiny, mlp, svd_cache_dir(fingerprint, torch.float32)) == []
