"""The source distribution builds on its own: it carries every kernel source and header.

setuptools puts an extension's listed sources into an sdist but not the headers they include,
so without MANIFEST.in a `pip install flatfused-*.tar.gz` (or `python -m build`, which builds
the wheel from the sdist) fails to compile."""
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to know the tracked files")
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines() if line]


def test_sdist_carries_every_kernel_source_and_header(tmp_path):
    tracked = _tracked_files()
    tree = tmp_path / "tree"
    for name in tracked:
        target = tree / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    dist = tmp_path / "dist"
    result = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(dist)],
                            cwd=tree, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    (archive,) = dist.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {"/".join(n.split("/")[1:]) for n in tar.getnames()}
    kernels = [n for n in tracked if n.startswith("csrc/")]
    assert kernels
    missing = sorted(set(kernels) - names)
    assert not missing, f"the sdist lacks {missing} (MANIFEST.in)"
    for name in ("setup.py", "pyproject.toml", "README.md", "triton_kernels/__init__.py",
                 "flatfused/op_schemas.def"):  # csrc/ops.cpp includes the schemas
        assert name in names, name
    assert not [n for n in names if n.endswith((".so", ".o", ".pyd"))], "build outputs in the sdist"
