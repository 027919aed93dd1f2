"""Commands that find their hub: `run` holds HUB_DATA_DIR and records its embedded servers
there; the other commands use them, or say that no hub runs there; a killed `run` leaves
no server behind; the embedded PostgreSQL keeps its port and works from a private folder."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from tests.support import start_hub_worker, wait_until
from worker import embedded
from worker.cli import running

pytestmark = pytest.mark.integration


@pytest.fixture
def private() -> Iterator[Path]:
    """A folder only its owner may enter, as `mktemp -d` makes."""
    path = Path(tempfile.mkdtemp(prefix="hub-worker-private-"))
    assert path.stat().st_mode & 0o077 == 0
    yield path
    shutil.rmtree(path, ignore_errors=True)


def env_for(data_dir: Path) -> dict[str, str]:
    return {"HUB_DATA_DIR": str(data_dir), "HUB_HTTP_ADDR": ""}


async def started(process: asyncio.subprocess.Process, data_dir: Path) -> running.HubState:
    """The state `run` recorded, once its streams exist."""

    async def recorded() -> bool:
        if process.returncode is not None:
            raise AssertionError(f"run exited with {process.returncode}")
        state = running.read_state(data_dir)
        return state.pid == process.pid and state.nats_url is not None

    await wait_until(recorded, within=60, what="hub.json")
    state = running.read_state(data_dir)
    assert state.nats_url is not None
    nc = await nats.connect(state.nats_url)
    try:

        async def streams() -> bool:
            try:
                await nc.jetstream().stream_info("HUB_OUT")
            except nats.js.errors.NotFoundError:
                return False
            return True

        await wait_until(streams, within=60, what="the streams")
    finally:
        await nc.close()
    return state


def hub_worker(*argv: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    return subprocess.run(
        [sys.executable, "-m", "worker", *argv],
        env=inherited | env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too (the test process is not its parent, so it is reaped elsewhere).
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "\nState:\tZ" in status.read_text())


async def stop(process: asyncio.subprocess.Process) -> int:
    if process.returncode is None:
        process.send_signal(signal.SIGINT)
    await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode


async def test_commands_find_the_hub_of_their_data_dir_and_a_second_run_is_refused(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "site" / ".hub"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    process = await start_hub_worker("run", env=env_for(data_dir), cwd=tmp_path)
    try:
        state = await started(process, data_dir)

        second = hub_worker("run", env=env_for(data_dir), cwd=elsewhere)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert "already running" in lines[0]
        assert f"pid {process.pid}" in lines[0]
        assert str(data_dir) in lines[0]

        # From another folder, pointed at the data directory: the recorded servers.
        here = {"HUB_DATA_DIR": str(data_dir)}
        published = hub_worker(
            "publish", "--spoke", "sp1", "--session", "s1", "signal", "tool_loop",
            "--severity", "high", env=here, cwd=elsewhere,
        )  # fmt: skip
        assert published.returncode == 0, published.stderr
        alerts = hub_worker("alerts", "--since", "all", "--count", "1", env=here, cwd=elsewhere)
        assert alerts.returncode == 0, alerts.stderr
        assert "TOOL_LOOP" in alerts.stdout
        listed = hub_worker("detections", "--json", env=here, cwd=elsewhere)
        assert listed.returncode == 0, listed.stderr
        assert [d["anomalyType"] for d in json.loads(listed.stdout)] == ["TOOL_LOOP"]
        assert state.database_url is not None
        assert "embedded" not in listed.stderr  # the banner is `run`'s alone
    finally:
        assert await stop(process) == 0
    assert running.read_state(data_dir).pid is None

    # No hub runs there now, nor in a folder that never had one: said, and nothing created.
    for where in (data_dir, elsewhere / ".hub"):
        for argv in (
            ["publish", "--spoke", "sp1", "--session", "s1", "heartbeat"],
            ["alerts"],
            ["resolve", "x", "--by", "ops", "--resolution", "fixed"],
            ["detections"],
            ["deadletters"],
            ["deadletters", "replay", "1"],
            ["accounts", "add", "ops"],
            ["migrate"],
        ):
            result = hub_worker(*argv, env={"HUB_DATA_DIR": str(where)}, cwd=elsewhere)
            assert result.returncode == 2, (argv, result.stderr)
            assert result.stderr.startswith(f"hub-worker {argv[0]}: no hub is running on")
            assert len(result.stderr.strip().splitlines()) == 1
    assert not (elsewhere / ".hub").exists()


async def test_a_killed_run_leaves_no_server_behind_and_postgres_keeps_its_port(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / ".hub"
    process = await start_hub_worker("run", env=env_for(data_dir), cwd=tmp_path)
    try:
        state = await started(process, data_dir)
        assert state.nats_pid is not None
        assert state.postgres_data_dir is not None
        postmaster = Path(state.postgres_data_dir) / "postmaster.pid"
        postgres_pid = int(postmaster.read_text().split()[0])
        assert alive(state.nats_pid)
        assert alive(postgres_pid)
    finally:
        process.kill()
        await process.wait()

    async def both_gone() -> bool:
        return not alive(nats_pid) and not alive(postgres_pid)

    nats_pid = state.nats_pid
    with contextlib.suppress(AssertionError):
        await wait_until(both_gone, within=10)
    assert not alive(state.nats_pid), "nats-server outlived the killed run"
    assert not alive(postgres_pid), "postgres outlived the killed run"

    # The next run starts at once, on the same PostgreSQL port.
    again = await start_hub_worker("run", env=env_for(data_dir), cwd=tmp_path)
    try:
        restarted = await started(again, data_dir)
        assert restarted.postgres_port == state.postgres_port
        assert restarted.database_url == state.database_url
    finally:
        assert await stop(again) == 0

    # And again after a clean stop, within 10 s.
    third = await start_hub_worker("run", env=env_for(data_dir), cwd=tmp_path)
    try:
        assert (await started(third, data_dir)).postgres_port == state.postgres_port
    finally:
        assert await stop(third) == 0


def test_a_port_in_time_wait_counts_as_free() -> None:
    server = embedded.free_port()
    with __import__("socket").create_server(("127.0.0.1", server)) as listener:
        client = __import__("socket").create_connection(("127.0.0.1", server))
        accepted, _ = listener.accept()
        accepted.close()  # the server side closes first: its end waits in TIME_WAIT
        client.close()
    assert embedded.port_is_free(server)
    assert embedded.preferred_port(server, 1) == server


@pytest.mark.skipif(os.geteuid() != 0, reason="the system user exists only for root")
def test_embedded_postgres_runs_as_root_from_a_private_folder(
    private: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Data and binaries inside a folder the system user cannot enter (a fresh clone in
    `mktemp -d`, its venv included); nothing outside the data directory changes mode."""
    installed = embedded.postgres_bin_dir().parent
    site = private / "clone" / ".venv" / "site-packages"
    inside = site / "embedded_postgres" / "pginstall"
    shutil.copytree(installed, inside, symlinks=True, ignore=shutil.ignore_patterns("include"))
    libs = installed.parent.parent / "embedded_postgres.libs"
    if libs.is_dir():
        shutil.copytree(libs, site / libs.name, symlinks=True)
    monkeypatch.setattr(embedded, "postgres_bin_dir", lambda: inside / "bin")
    data_dir = private / "clone" / ".hub" / "postgres"
    parents = [private, *private.parents]
    modes = {p: p.stat().st_mode for p in parents}

    server = embedded.EmbeddedPostgres(data_dir)
    try:
        dsn = server.start()
        assert server.bin.parent != inside  # a copy the system user can run
        assert server.data_dir != data_dir
        assert str(server.data_dir) in (data_dir / "LOCATION").read_text()
        psql = subprocess.run(
            [str(server.bin / "psql"), dsn, "-Atc", "SELECT current_user"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert psql.stdout.strip() == "postgres", psql.stderr
        server.stop()
        # It comes back with its data from the same place.
        again = embedded.EmbeddedPostgres(data_dir, port=server.port)
        again.start()
        assert again.data_dir == server.data_dir
        again.stop()
    finally:
        server.stop()
        shutil.rmtree(server.data_dir, ignore_errors=True)
        if server.bin.parent != inside:  # the copy made of this test's private install
            shutil.rmtree(server.bin.parent.parent.parent, ignore_errors=True)
    assert {p: p.stat().st_mode for p in parents} == modes
