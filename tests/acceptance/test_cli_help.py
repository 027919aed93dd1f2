"""`run --help` names the settings; `migrate` against a server that never answers gives up."""

from __future__ import annotations

import re
import time

import pytest

from tests.support import ROOT
from worker import cli
from worker.cli import admin
from worker.cli.common import Endpoints
from worker.config import Settings
from worker.embedded import free_port


def test_run_help_lists_the_variables_of_the_readme(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["run", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Configuration", 1)[1].split("Credentials and TLS", 1)[0]
    variables = re.findall(r"^\| `(HUB_[A-Z_]+)`", table, flags=re.MULTILINE)
    assert len(variables) >= 10
    for variable in variables:
        assert variable in text, variable
    assert "PU_" not in text


def test_migrate_gives_up_on_a_database_that_never_answers(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(admin, "MIGRATE_GIVE_UP_SECONDS", 2.0)
    url = f"postgresql://hub:s3cret@127.0.0.1:{free_port()}/hub"
    began = time.monotonic()
    code = admin.migrate_command(Settings(database_url=url), Endpoints(url, []))
    assert code == 1
    assert time.monotonic() - began < 10
    err = capsys.readouterr().err
    assert "no database answered at postgresql://127.0.0.1:" in err
    assert "within 2 s" in err
    assert "s3cret" not in err
