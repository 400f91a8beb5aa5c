from twinloop.plant.numba_cache import drop_stale_cache


def _layout(tmp_path):
    module = tmp_path / "kernel.py"
    dep = tmp_path / "model.py"
    module.write_text("# kernel\n")
    dep.write_text("A = 1\n")
    cache = tmp_path / "__pycache__"
    cache.mkdir()
    return module, dep, cache


def _cache_files(cache):
    for name in ("kernel.step-10.py311.nbi", "kernel.step-10.py311.1.nbc"):
        (cache / name).write_bytes(b"x")
    (cache / "model.other-3.py311.nbi").write_bytes(b"x")  # another module's: never touched


def test_cache_is_dropped_when_a_dependency_changes_and_kept_otherwise(tmp_path):
    module, dep, cache = _layout(tmp_path)
    _cache_files(cache)
    assert drop_stale_cache(str(module), [str(dep)])  # no stamp yet: unknown provenance
    assert sorted(p.name for p in cache.glob("*.nb*")) == ["model.other-3.py311.nbi"]
    _cache_files(cache)
    assert not drop_stale_cache(str(module), [str(dep)])  # unchanged: the cache stays
    assert len(list(cache.glob("kernel.*.nb*"))) == 2
    dep.write_text("A = 2\n")  # same size, new contents
    assert drop_stale_cache(str(module), [str(dep)])
    assert not list(cache.glob("kernel.*.nb*"))
    assert (cache / "model.other-3.py311.nbi").exists()


def test_an_unwritable_cache_directory_is_left_alone(tmp_path):
    module, dep, cache = _layout(tmp_path)
    cache.rmdir()
    cache.write_text("not a directory")
    assert drop_stale_cache(str(module), [str(dep)]) is False
