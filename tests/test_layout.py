"""Structure: modules import alone, dependencies flow one way, generated code matches proto/."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

MODULES = sorted(
    ".".join(p.relative_to(REPO).with_suffix("").parts)
    for pkg in ("common", "fedserver", "fedclient")
    for p in (REPO / pkg).rglob("*.py")
    if "__pycache__" not in p.parts
)
FORBIDDEN = {"common": ("fedserver", "fedclient"), "fedserver": ("fedclient",), "fedclient": ("fedserver",)}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_and_respects_layering(package):
    """A fresh interpreter imports every module of the package (one interpreter per package:
    each start imports torch, ~2 s); afterwards no forbidden package may be loaded."""
    mods = [m.removesuffix(".__init__") for m in MODULES if m.split(".")[0] == package]
    code = (f"import importlib, sys\nfor m in {mods!r}: importlib.import_module(m)\n"
            f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN[package]!r}]\nprint(bad)\nsys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"{package}: {proc.stdout[-500:]} {proc.stderr[-1500:]}"


def test_generated_protobuf_code_matches_proto():
    proc = subprocess.run([sys.executable, "scripts/gen_protos.py", "--check"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
