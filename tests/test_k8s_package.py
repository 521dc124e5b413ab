"""widep's Kubernetes output from an installed wheel, outside the repository.

Real components: setuptools builds the wheel from this checkout, pip installs it into a fresh virtual
environment in a temporary directory, and the installed ``widep`` console script generates and
validates manifests there with the CRDs shipped as package data. The dependencies (pydantic,
jsonschema, kubernetes-validate, ...) are not downloaded again: the fresh environment reads them
from the test interpreter's site-packages through a ``.pth`` line placed after its own
site-packages, so the ``widep`` it imports is the wheel's (the test checks where it comes from).
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "schemas"
DATA = REPO / "widep" / "k8s" / "data"
SHIPPED = ("lws-crd-v0.10.0.yaml", "inferencepool-crd-v1.5.0.yaml")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_crds_are_byte_identical_to_shared_schemas(name):
    assert (SHARED / name).is_file(), f"{SHARED / name} is the reference copy"
    assert (DATA / name).read_bytes() == (SHARED / name).read_bytes()


def test_pyproject_ships_the_data_directory():
    text = (REPO / "pyproject.toml").read_text()
    assert '"k8s/data/*"' in text
    assert sorted(p.name for p in DATA.glob("*.yaml")) == sorted(SHIPPED)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv (outside the repository) with widep installed from a freshly built wheel."""
    root = tmp_path_factory.mktemp("wheel")
    wheels = root / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("widep-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # dependencies only: the editable widep of the test environment is a .pth finder there, which a
    # path added by a .pth line does not run
    Path(site, "zz-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return venv


def _run(venv: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WIDEP_LWS_CRD", "PYTHONPATH")}
    return subprocess.run(
        [str(venv / "bin" / "widep"), *args], check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_installed_widep_emits_and_validates_manifests_outside_the_repo(installed, tmp_path):
    where = subprocess.run(
        [
            str(installed / "bin" / "python"),
            "-c",
            "import widep.k8s.validate as v; print(v.__file__); print(v.default_crd_path())",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert all(p.startswith(str(installed)) for p in where), where
    topo = tmp_path / "pd.yaml"
    topo.write_text((REPO / "topologies" / "deepseek-r1-decode-2x8-h200.yaml").read_text())
    out = tmp_path / "pd-manifests.yaml"
    # an InferencePool of widep's own: one per role (llm-d's P/D pool is the router chart's, issue 28)
    gen = _run(installed, tmp_path, "lws", str(topo), "--inference-pool", "-o", str(out))
    assert gen.returncode == 0, gen.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(out.read_text())]
    assert "InferencePool" in kinds
    check = _run(installed, tmp_path, "lws", "--validate", str(out))
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.startswith("ok: ") and "note" not in check.stdout  # the pool is checked, not skipped
    bad = tmp_path / "bad.yaml"
    bad.write_text(out.read_text().replace("number: 8001", "number: 8000", 1))
    refused = _run(installed, tmp_path, "lws", "--validate", str(bad))
    assert refused.returncode == 1 and "port number must be unique" in refused.stdout
