"""The wheel: what it installs (no bare ``analysis`` package, the license) and that the installed
package works from outside the checkout, ``implicit-nash verify`` included."""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("setuptools")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy of the sources, so that the build leaves nothing in the checkout
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("implicit_nash", "analysis"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = (tmp / "dist").glob("implicit_nash-*.whl")
    return path


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {n.split("/")[0] for n in names}
    assert "analysis" not in tops, "a bare top-level 'analysis' package clashes with others of that name"
    assert {"implicit_nash", "implicit_nash_analysis"} <= tops
    for folder, installed in (("implicit_nash", "implicit_nash"), ("analysis", "implicit_nash_analysis")):
        for f in (ROOT / folder).rglob("*.py"):
            rel = f.relative_to(ROOT / folder).as_posix()
            assert f"{installed}/{rel}" in names, f"{folder}/{rel} is not in the wheel"
    assert "implicit_nash/data/paper_tables.json" in names
    licenses = [n for n in names if ".dist-info/" in n and n.endswith("LICENSE")]
    assert licenses, "LICENSE is not in the wheel"
    assert "MIT License" in zipfile.ZipFile(wheel).read(licenses[0]).decode()


def test_installed_package_works_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # a pure-Python wheel: installing is unpacking
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    code = ("import json, implicit_nash, implicit_nash_analysis; "
            "print(json.dumps([implicit_nash.__file__, implicit_nash_analysis.__file__, "
            "sorted(implicit_nash_analysis.CHECKS)]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lib, ana, checks = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(lib).is_relative_to(site) and Path(ana).is_relative_to(site)
    assert "lemma_b4" in checks
    # ``implicit-nash verify`` from another directory runs the installed analysis package (the test
    # environment may have another ``analysis`` importable: it must not be used)
    code = ("import sys; from implicit_nash.cli import main; "
            "rc = main(['verify', '--quick', '--check', 'lemma_b4', '--out', 'checks']); "
            "print(sys.modules['implicit_nash_analysis'].__file__); print('analysis' in sys.modules); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    used, bare = proc.stdout.strip().splitlines()[-2:]
    assert Path(used).is_relative_to(site) and bare == "False"
    assert json.loads((elsewhere / "checks" / "lemma_b4.json").read_text())["verdict"] == "holds"
