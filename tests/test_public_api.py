"""The curated API of `jaxft/__init__.py`: every name resolves, `import jaxft` loads nothing heavy, and the
README's Python example runs (on a tiny Llama) with its assertion (LoRA merged generates what LoRA does)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import tiny

ROOT = Path(__file__).resolve().parents[1]


def test_every_public_name_resolves_and_the_import_is_light():
    code = ("import sys, jaxft; assert 'jax' not in sys.modules, 'import jaxft imported jax'; "
            "missing = [n for n in jaxft.__all__ if getattr(jaxft, n, None) is None]; assert not missing, missing")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr


def test_readme_example_runs(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"Python API in `jaxft/__init__.py`.*?```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(ROOT)
    exec(compile(example, "README.md", "exec"), {"MODEL": str(tiny.llama_dir(tmp_path / "model"))})
