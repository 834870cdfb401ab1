"""The core model cache the widgets (and a server) keep: one load per file version, LRU, reload on change."""
from __future__ import annotations

import os
import shutil
import threading

import pytest
from inference_models import make_model

from napari_dmoe.io.checkpoint import CheckpointError
from napari_dmoe.io.model_cache import ModelCache


def test_cache_reuses_reloads_on_change_and_drops_the_least_recent(tmp_path):
    a = make_model(tmp_path / "a.safetensors")
    b = shutil.copy(a, tmp_path / "b.safetensors")
    cache = ModelCache(size=1)
    first = cache.get(a)
    assert cache.get(str(a)) is first and cache.get(tmp_path / "." / "a.safetensors") is first
    st = os.stat(a)
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a fine-tune wrote a new checkpoint
    second = cache.get(a)
    assert second is not first
    other = cache.get(b)
    assert cache.get(a) is not second and other is not second  # size 1: b pushed a out
    big = ModelCache(size=2)
    models = [big.get(a), big.get(b)]
    assert [big.get(a), big.get(b)] == models
    with pytest.raises(CheckpointError):
        big.get(tmp_path / "missing.safetensors")


def test_threads_share_one_load(tmp_path):
    path = make_model(tmp_path / "m.safetensors")
    cache, got = ModelCache(), []
    threads = [threading.Thread(target=lambda: got.append(cache.get(path))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 4 and all(m is got[0] for m in got)
