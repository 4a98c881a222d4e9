"""The environment the tests run in is the locked one: every installed distribution is pinned in locks/test.txt
at the version installed, and pyproject.toml's ranges admit every locked version. A run on releases nobody
locked fails here, naming the package, instead of passing or failing elsewhere for reasons nobody can repeat."""

from __future__ import annotations

import importlib.metadata as metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "locks" / "test.txt"
FIX = "reinstall through the lock: pip install -c locks/test.txt -e '.[test]'"
# Installers and the project itself are not what the lock pins.
NOT_LOCKED = {"pip", "setuptools", "wheel", "jaxft"}


def _locked(path: Path) -> dict[str, str]:
    """{canonical name: version} of a `uv pip compile` output: `name==version` lines, comments skipped."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{path.name}: {line!r} is not an exact pin"
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def _installed() -> dict[str, str]:
    return {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}


def test_installed_distributions_are_the_locked_ones():
    locked = _locked(LOCK)
    wrong = []
    for name, version in sorted(_installed().items()):
        if name in NOT_LOCKED:
            continue
        if name not in locked:
            wrong.append(f"{name} {version} is installed but not in {LOCK.name}")
        # `==2.13.0` admits a local build such as 2.13.0+cpu, as pip does
        elif version not in SpecifierSet(f"=={locked[name]}"):
            wrong.append(f"{name} {version} is installed, {LOCK.name} pins {locked[name]}")
    assert not wrong, "; ".join(wrong) + f" ({FIX})"


def test_project_ranges_admit_the_locked_versions():
    locked = _locked(LOCK)
    requirements = [Requirement(r) for r in metadata.requires("jaxft")]
    out = []
    for req in requirements:
        name = canonicalize_name(req.name)
        extra = req.marker is not None and "extra" in str(req.marker)
        if extra and not any(req.marker.evaluate({"extra": e}) for e in ("gguf", "test")):
            continue
        assert name in locked, f"jaxft requires {req}, which {LOCK.name} does not pin"
        if locked[name] not in req.specifier:
            out.append(f"{req} excludes the locked {name}=={locked[name]}")
    assert not out, "; ".join(out)


def test_lock_files_agree():
    """runtime.txt and gguf.txt are subsets of test.txt at the same versions (they are compiled against it)."""
    test = _locked(LOCK)
    for other in ("runtime.txt", "gguf.txt"):
        pins = _locked(LOCK.with_name(other))
        assert pins.keys() <= test.keys(), f"{other} pins {sorted(pins.keys() - test.keys())} that test.txt lacks"
        differ = {n: (v, test[n]) for n, v in pins.items() if test[n] != v}
        assert not differ, f"{other} and test.txt pin different versions: {differ}"
