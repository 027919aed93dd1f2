"""The compose stack and the image, checked statically: no Docker engine, no servers.

docker-compose.yml, Dockerfile, .env.example and deploy/demo_spoke.py are read as files
and held to what the contract and deploy/README.md promise: pinned images, health
checks, start order, the contract's HUB_* names only, no credentials, a non-root image
that runs `hub-worker`, and a demo spoke whose events the worker accepts. When a compose
client is installed, it parses the file too (`config` needs no engine).
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from worker.intake import decode

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
DEMO_SPOKE = ROOT / "deploy" / "demo_spoke.py"

CORE_SERVICES = {"nats", "postgres", "migrate", "worker"}
DEMO_SERVICES = {"demo-spoke", "alerts"}
OBSERVABILITY_SERVICES = {"prometheus", "grafana"}
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ALERT_RULES = ROOT / "deploy" / "prometheus" / "hub-worker-rules.yml"
GRAFANA = ROOT / "deploy" / "grafana"
OPS_SERVICES = {"accounts"}
NON_ROOT_UID = "10001"

# `${NAME}`, `${NAME:-default}`, `${NAME?error}` ... and bare `$NAME`; `$$` is a literal `$`.
_INTERPOLATION_RE = re.compile(
    r"\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<operator>:?[-?+])?[^}]*\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)
_HUB_NAME_RE = re.compile(r"\bHUB_[A-Z0-9_]+\b")
_DSN_RE = re.compile(r"postgres(?:ql)?://(?P<user>[^:@/\s]*):(?P<password>[^@\s]*)@")


# -- what the files say --------------------------------------------------------------


@pytest.fixture(scope="module")
def compose_text() -> str:
    return COMPOSE_FILE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def compose(compose_text: str) -> dict[str, Any]:
    document = yaml.safe_load(compose_text)
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose["services"]
    assert isinstance(found, dict)
    return found


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    """The variables .env.example sets (commented-out lines do not count)."""
    values: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f".env.example: not NAME=value: {line!r}"
            values[name.strip()] = value.strip()
    return values


def interpolations(text: str) -> dict[str, bool]:
    """Each variable the compose file interpolates -> whether it has a default."""
    found: dict[str, bool] = {}
    for match in _INTERPOLATION_RE.finditer(text.replace("$$", "")):
        name = match["braced"] or match["bare"]
        defaulted = (match["operator"] or "").endswith(("-", "+"))
        found[name] = found.get(name, True) and defaulted
    return found


def contract_variables() -> set[str]:
    """HUB_* names of the contract's section 1 table, plus those the worker reads."""
    contract = (ROOT / "docs" / "contract.md").read_text(encoding="utf-8")
    section = contract.split("## 1.", 1)[1].split("\n## ", 1)[0]
    names = set(re.findall(r"^\| `(HUB_[A-Z0-9_]+)` \|", section, flags=re.MULTILINE))
    assert {"HUB_NATS_URL", "HUB_DATABASE_URL", "HUB_SUBJECT_PREFIX"} <= names, names
    config = (ROOT / "worker" / "config.py").read_text(encoding="utf-8")
    return names | set(re.findall(r"[\"'](HUB_[A-Z0-9_]+)[\"']", config))


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(key): str(value) for key, value in env.items()}


def named_volumes(compose: dict[str, Any], service: dict[str, Any]) -> list[tuple[str, str]]:
    """(volume, target) of the service's mounts of top-level named volumes."""
    declared = set(compose.get("volumes") or {})
    mounts = []
    for mount in service.get("volumes") or []:
        if isinstance(mount, str):
            source, _, rest = mount.partition(":")
            target = rest.split(":")[0]
        else:
            source, target = mount.get("source", ""), mount.get("target", "")
        if source in declared:
            mounts.append((source, target))
    return mounts


def python_code(command: list[str]) -> str:
    """The program of a `python -c PROGRAM` health check."""
    assert "-c" in command, command
    return command[command.index("-c") + 1]


# -- docker-compose.yml --------------------------------------------------------------


def test_the_stack_has_its_services(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == CORE_SERVICES | DEMO_SERVICES | OBSERVABILITY_SERVICES | OPS_SERVICES


def test_every_image_is_pinned_to_a_version(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        if "image" not in service:
            continue
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository, f"{name}: {image} has no tag"
        assert "/" not in tag, f"{name}: {image} has no tag"
        assert "$" not in image, f"{name}: {image} is not fixed in the file"
        assert tag != "latest", f"{name}: {image} is not a version"
        assert re.search(r"\d", tag), f"{name}: {image} is not a version"


def test_servers_have_health_checks_and_named_volumes(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    for name in ("nats", "postgres"):
        service = services[name]
        check = service.get("healthcheck") or {}
        assert check.get("test"), f"{name}: no health check"
        assert not check.get("disable"), f"{name}: health check disabled"
        assert named_volumes(compose, service), f"{name}: data not on a named volume"
        assert service.get("restart") == "unless-stopped", name


def test_nats_runs_jetstream_on_its_volume_with_monitoring(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    nats = services["nats"]
    command = nats["command"]
    assert "-js" in command
    assert command[command.index("-sd") + 1] == "/data"
    assert command[command.index("-m") + 1] == "8222"
    assert ("nats-data", "/data") in named_volumes(compose, nats)
    probe = " ".join(nats["healthcheck"]["test"])
    assert "wget" in probe
    assert ":8222/healthz?js-enabled-only=true" in probe


def test_postgres_keeps_its_data_where_the_image_expects_it(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    postgres = services["postgres"]
    version = re.match(r"postgres:(\d+)", postgres["image"])
    assert version is not None, postgres["image"]
    major = int(version[1])
    assert major >= 15, "the contract needs PostgreSQL 15 or later"
    # From 18 on, the official image keeps PGDATA in a versioned directory under
    # /var/lib/postgresql and refuses a volume on /var/lib/postgresql/data.
    expected = "/var/lib/postgresql" if major >= 18 else "/var/lib/postgresql/data"
    assert [target for _, target in named_volumes(compose, postgres)] == [expected]
    probe = " ".join(postgres["healthcheck"]["test"])
    # `$$`: the container's variables, read when the check runs, not compose's.
    assert "pg_isready" in probe
    assert "$${POSTGRES_USER}" in probe
    assert "$${POSTGRES_DB}" in probe
    # Over TCP, so that the image's socket-only init server does not count as ready.
    assert "-h 127.0.0.1" in probe


@pytest.mark.parametrize("name", ["migrate", "worker", "demo-spoke"])
def test_hub_services_build_the_repository_image(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    build = services[name]["build"]
    if isinstance(build, str):
        build = {"context": build}
    assert (COMPOSE_FILE.parent / build["context"]).resolve() == ROOT
    assert build.get("dockerfile", "Dockerfile") == "Dockerfile"
    assert "image" not in services[name], "a built image is not pulled"


def test_migrate_runs_once_after_postgres(services: dict[str, dict[str, Any]]) -> None:
    migrate = services["migrate"]
    assert migrate["command"] == ["migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert environment(migrate)["HUB_DATABASE_URL"].startswith("postgresql://")


def test_worker_starts_after_the_servers_and_the_migration(
    services: dict[str, dict[str, Any]],
) -> None:
    worker = services["worker"]
    assert worker["command"] == ["run"]
    assert worker["depends_on"] == {
        "nats": {"condition": "service_healthy"},
        "postgres": {"condition": "service_healthy"},
        "migrate": {"condition": "service_completed_successfully"},
    }
    assert worker["restart"] == "unless-stopped"


def test_worker_is_configured_for_the_stack(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    env = environment(worker)
    assert env["HUB_NATS_URL"] == "nats://nats:4222"
    # The worker runs as the runtime role, the migration as the owner, which grants
    # the runtime role its rows; passwords stay out of the URLs.
    assert env["HUB_DATABASE_URL"] == "postgresql://${RUNTIME_DB_USER}@postgres:5432/${POSTGRES_DB}"
    assert env["HUB_DATABASE_PASSWORD"] == "${RUNTIME_DB_PASSWORD}"
    migrate = environment(services["migrate"])
    assert (
        migrate["HUB_DATABASE_URL"] == "postgresql://${POSTGRES_USER}@postgres:5432/${POSTGRES_DB}"
    )
    assert migrate["HUB_DATABASE_PASSWORD"] == "${POSTGRES_PASSWORD}"
    assert migrate["HUB_DATABASE_RUNTIME_ROLE"] == "${RUNTIME_DB_USER}"
    assert "HUB_SUBJECT_PREFIX" in env
    assert env["HUB_LOG_FORMAT"] == "json"
    assert env["HUB_HTTP_ADDR"] == "0.0.0.0:9464"
    assert any(str(port).endswith(":9464") for port in worker["ports"])
    test = worker["healthcheck"]["test"]
    code = python_code(test)
    compile(code, "worker healthcheck", "exec")
    assert "http://127.0.0.1:9464/healthz" in code


def test_postgres_creates_the_runtime_role_on_first_start(
    services: dict[str, dict[str, Any]],
) -> None:
    postgres = services["postgres"]
    env = environment(postgres)
    for name in ("RUNTIME_DB_USER", "RUNTIME_DB_PASSWORD"):
        assert re.fullmatch(rf"\$\{{{name}:?\?[^}}]*\}}", env[name]), env[name]
    [init] = [m for m in postgres["volumes"] if isinstance(m, dict)]
    assert init["target"] == "/docker-entrypoint-initdb.d"
    assert init["read_only"] is True
    scripts = sorted((COMPOSE_FILE.parent / init["source"]).iterdir())
    assert [p.name for p in scripts] == ["10-runtime-role.sh"]
    script = scripts[0]
    # The image runs executable scripts and sources the others; either way sh must parse it.
    assert os.access(script, os.X_OK)
    subprocess.run(["sh", "-n", str(script)], check=True)
    text = script.read_text(encoding="utf-8")
    assert '--set role="$RUNTIME_DB_USER"' in text
    assert '--set password="$RUNTIME_DB_PASSWORD"' in text
    assert """CREATE ROLE :"role" LOGIN PASSWORD :'password';""" in text


def test_published_ports_listen_on_loopback_only(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for port in service.get("ports") or []:
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port} is reachable from outside"


def test_hub_variables_are_the_contracts(compose_text: str) -> None:
    allowed = contract_variables()
    used = set(_HUB_NAME_RE.findall(compose_text))
    assert used, "the compose file configures the worker through HUB_* variables"
    assert used <= allowed, f"not contract variables: {sorted(used - allowed)}"


def test_no_credentials_in_the_compose_file(
    compose_text: str, services: dict[str, dict[str, Any]], env_example: dict[str, str]
) -> None:
    password = environment(services["postgres"])["POSTGRES_PASSWORD"]
    assert re.fullmatch(r"\$\{POSTGRES_PASSWORD:?\?[^}]*\}", password), password
    for service in services.values():
        for key, value in environment(service).items():
            if re.search(r"PASSWORD|SECRET|TOKEN", key):
                assert value.startswith("${"), f"{key} has a literal value"
    for dsn in _DSN_RE.finditer(compose_text):
        assert re.fullmatch(r"\$\{[A-Z_]+\}", dsn["password"]), dsn[0]
    assert env_example["POSTGRES_PASSWORD"] not in compose_text


def test_demo_services_run_only_with_the_demo_profile(
    services: dict[str, dict[str, Any]],
) -> None:
    for name in DEMO_SERVICES:
        assert services[name]["profiles"] == ["demo"], name
    for name in CORE_SERVICES:
        assert "profiles" not in services[name], f"{name} would not start by default"


def test_observability_services_run_only_with_their_profile(
    services: dict[str, dict[str, Any]],
) -> None:
    for name in OBSERVABILITY_SERVICES:
        assert services[name]["profiles"] == ["observability"], name


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """target -> source (resolved) of the service's bind mounts, each read-only."""
    mounts = {}
    for mount in service.get("volumes") or []:
        if isinstance(mount, dict) and mount.get("type") == "bind":
            assert mount.get("read_only") is True, mount
            source = (COMPOSE_FILE.parent / mount["source"]).resolve()
            assert source.exists(), f"{mount['source']}: not in the repository"
            mounts[mount["target"]] = source
    return mounts


def test_prometheus_scrapes_the_worker_with_the_alert_rules(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    prometheus = services["prometheus"]
    mounts = bind_mounts(prometheus)
    command = " ".join(prometheus["command"])
    config_path = re.search(r"--config\.file=(\S+)", command)
    assert config_path is not None
    assert mounts[config_path[1]] == PROMETHEUS_CONFIG
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    # The rule files the config loads are the mounted rules.
    loaded = [
        target
        for target, source in mounts.items()
        for pattern in config["rule_files"]
        if fnmatch.fnmatch(target, pattern)
    ]
    assert [mounts[target] for target in loaded] == [ALERT_RULES]
    # The rules and the dashboard select job="hub-worker"; the target is the worker's port.
    [job] = config["scrape_configs"]
    assert job["job_name"] == "hub-worker"
    assert 'job="hub-worker"' in ALERT_RULES.read_text(encoding="utf-8")
    worker_port = environment(services["worker"])["HUB_HTTP_ADDR"].rpartition(":")[2]
    # Every replica (`--scale worker=3`): the service name resolves to each address.
    [discovery] = job["dns_sd_configs"]
    assert discovery["names"] == ["worker"]
    assert discovery["type"] == "A"
    assert str(discovery["port"]) == worker_port
    assert ("prometheus-data", "/prometheus") in named_volumes(compose, prometheus)
    assert "--storage.tsdb.path=/prometheus" in command


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    grafana = services["grafana"]
    mounts = bind_mounts(grafana)
    assert mounts["/etc/grafana/provisioning"] == GRAFANA / "provisioning"
    [datasources] = (GRAFANA / "provisioning" / "datasources").glob("*.yml")
    [datasource] = yaml.safe_load(datasources.read_text(encoding="utf-8"))["datasources"]
    assert datasource["type"] == "prometheus"
    prometheus_port = services["prometheus"]["ports"][0].rpartition(":")[2]
    assert datasource["url"] == f"http://prometheus:{prometheus_port}"
    [provider_file] = (GRAFANA / "provisioning" / "dashboards").glob("*.yml")
    [provider] = yaml.safe_load(provider_file.read_text(encoding="utf-8"))["providers"]
    dashboards_at = provider["options"]["path"]
    assert mounts[dashboards_at] == GRAFANA / "dashboards"
    dashboard = json.loads((GRAFANA / "dashboards" / "hub-worker.json").read_text("utf-8"))
    # The dashboard's datasource variable defaults to the provisioned one.
    [variable] = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["current"]["value"] == datasource["uid"]
    env = environment(grafana)
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == f"{dashboards_at}/hub-worker.json"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:\?[^}]*\}", env["GF_SECURITY_ADMIN_PASSWORD"])
    assert ("grafana-data", "/var/lib/grafana") in named_volumes(compose, grafana)
    assert services["grafana"]["depends_on"] == {"prometheus": {"condition": "service_started"}}


def test_accounts_run_one_shot_as_the_schema_owner(
    services: dict[str, dict[str, Any]],
) -> None:
    """The runtime role may only read accounts (sql/grants.sql): `accounts` runs as the
    owner that `migrate` runs as, on demand (`--profile ops run --rm accounts add …`)."""
    accounts, migrate = services["accounts"], services["migrate"]
    assert accounts["profiles"] == ["ops"]
    assert accounts["entrypoint"] == ["hub-worker", "accounts"]
    assert accounts["restart"] == "no"
    assert accounts["depends_on"] == {"migrate": {"condition": "service_completed_successfully"}}
    for key in ("HUB_DATABASE_URL", "HUB_DATABASE_PASSWORD"):
        assert environment(accounts)[key] == environment(migrate)[key], key
    assert (
        environment(accounts)["HUB_DATABASE_URL"]
        != environment(services["worker"])["HUB_DATABASE_URL"]
    )
    grants = (ROOT / "sql" / "grants.sql").read_text()
    on_accounts = re.findall(r"^GRANT (.+) ON accounts TO", grants, flags=re.MULTILINE)
    assert on_accounts == ["SELECT"], "the runtime role may not write accounts"
    assert "profiles" not in services["worker"]


def test_demo_spoke_runs_the_mounted_script(services: dict[str, dict[str, Any]]) -> None:
    spoke = services["demo-spoke"]
    [mount] = spoke["volumes"]
    assert mount["type"] == "bind"
    assert mount["read_only"] is True
    assert (COMPOSE_FILE.parent / mount["source"]).resolve() == DEMO_SPOKE
    assert spoke["entrypoint"] == ["python", mount["target"]]
    assert spoke["depends_on"]["nats"] == {"condition": "service_healthy"}
    command = spoke["command"]
    assert command[command.index("--server") + 1] == "nats://nats:4222"


def test_alerts_follows_the_detections(services: dict[str, dict[str, Any]]) -> None:
    alerts = services["alerts"]
    assert alerts["image"].startswith("natsio/nats-box:")
    command = alerts["command"]
    assert command[:3] == ["nats", "--server", "nats://nats:4222"]
    assert command[3] == "sub"
    assert command[4].endswith(".detection.>")


def test_env_example_sets_every_required_variable(
    compose_text: str, env_example: dict[str, str]
) -> None:
    used = interpolations(compose_text)
    required = {name for name, defaulted in used.items() if not defaulted}
    assert required, "the credentials come from .env"
    assert required <= set(env_example), f"missing in .env.example: {required - set(env_example)}"
    # The optional ones are documented there too (commented out is enough).
    text = ENV_EXAMPLE.read_text(encoding="utf-8")
    undocumented = {name for name in used if not re.search(rf"^#?{name}=", text, re.MULTILINE)}
    assert not undocumented, f"not in .env.example: {sorted(undocumented)}"
    assert set(env_example) <= set(used), "a variable in .env.example is not used"


def test_env_example_values_are_local_development_ones(env_example: dict[str, str]) -> None:
    assert env_example["POSTGRES_USER"] == "hub"
    assert env_example["POSTGRES_DB"] == "hub"
    assert env_example["HUB_SUBJECT_PREFIX"] == "hub"
    assert "local" in env_example["POSTGRES_PASSWORD"]
    assert "local" in env_example["RUNTIME_DB_PASSWORD"]
    assert env_example["RUNTIME_DB_USER"] != env_example["POSTGRES_USER"]


def test_the_real_env_file_stays_private() -> None:
    assert ".env" in (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()
    assert ".env" in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()


# -- Dockerfile ----------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


@dataclass(frozen=True)
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[str]:
        return [i.arguments for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"stage {self.name}: no {keyword}"
        return found[-1]


def dockerfile_stages() -> list[Stage]:
    """The Dockerfile's stages, with continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).strip().partition(" ")
        instructions.append(Instruction(keyword.upper(), " ".join(arguments.split())))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"

    build_args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            words = [w for w in instruction.arguments.split() if not w.startswith("--")]
            image = re.sub(
                r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: build_args[m[1]], words[0]
            )
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(image, name, []))
        elif not stages:
            assert instruction.keyword == "ARG", "only ARG may come before the first FROM"
            arg, _, default = instruction.arguments.partition("=")
            build_args[arg] = default
        else:
            stages[-1].instructions.append(instruction)
    return stages


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list), arguments
    assert all(isinstance(v, str) for v in value), arguments
    return value


def dockerignored(path: str) -> bool:
    patterns = [
        p.strip().rstrip("/")
        for p in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if p.strip() and not p.strip().startswith(("#", "!"))
    ]
    parts = Path(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(
        fnmatch.fnmatch(candidate, pattern) or fnmatch.fnmatch(candidate, f"*/{pattern}")
        for candidate in candidates
        for pattern in (p.removeprefix("**/") for p in patterns)
    )


def test_dockerfile_builds_in_two_pinned_stages() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2, "a build stage and a runtime stage"
    for stage in stages:
        repository, _, tag = stage.image.rpartition(":")
        assert repository == "python", stage.image
        assert tag.startswith("3.11."), stage.image
        assert "slim" in tag, stage.image
    build = stages[0]
    assert any("pip wheel" in run or "python -m build" in run for run in build.all("RUN")), (
        "the build stage makes the wheel"
    )


def test_dockerfile_copies_only_files_that_are_in_the_context() -> None:
    copied = []
    for stage in dockerfile_stages():
        for keyword in ("COPY", "ADD"):
            for arguments in stage.all(keyword):
                if "--from=" in arguments:
                    continue
                words = [w for w in arguments.split() if not w.startswith("--")]
                for source in words[:-1]:
                    assert (ROOT / source).exists(), f"{keyword} {source}: not in the repository"
                    assert not dockerignored(source), f"{keyword} {source}: in .dockerignore"
                    copied.append(source)
    assert {"pyproject.toml", "worker", "sql"} <= set(copied)


def test_runtime_stage_runs_hub_worker_as_a_user() -> None:
    runtime = dockerfile_stages()[-1]
    user = runtime.last("USER").split(":")[0]
    assert user not in ("root", "0"), "the image must not run as root"
    assert user == NON_ROOT_UID
    assert runtime.last("WORKDIR") == "/app"
    assert exec_form(runtime.last("ENTRYPOINT")) == ["hub-worker"]
    assert exec_form(runtime.last("CMD")) == ["run"]
    assert "9464" in runtime.last("EXPOSE").split()
    env = " ".join(runtime.all("ENV"))
    assert "HUB_DATA_DIR=/app/data" in env
    assert "HUB_HTTP_ADDR=0.0.0.0:9464" in env
    assert set(_HUB_NAME_RE.findall(env)) <= contract_variables()
    # The runtime installs the built wheel; the source tree stays in the build stage.
    assert not [a for a in runtime.all("COPY") if "--from=" not in a]


def test_runtime_stage_checks_its_health_endpoint() -> None:
    runtime = dockerfile_stages()[-1]
    healthcheck = runtime.last("HEALTHCHECK")
    command = exec_form(healthcheck[healthcheck.index("CMD") + len("CMD") :].strip())
    code = python_code(command)
    compile(code, "Dockerfile HEALTHCHECK", "exec")
    assert "urllib.request" in code
    assert "http://127.0.0.1:{port}/healthz" in code


# -- deploy/demo_spoke.py ------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_spoke() -> ModuleType:
    spec = importlib.util.spec_from_file_location("demo_spoke", DEMO_SPOKE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def contract_inbound_subject() -> re.Pattern[str]:
    """The inbound subjects of the contract's section 3 table, as one pattern."""
    contract = (ROOT / "docs" / "contract.md").read_text(encoding="utf-8")
    section = contract.split("## 3.", 1)[1].split("\n## ", 1)[0]
    identifier = r"[A-Za-z0-9_-]{1,128}"
    alternatives = []
    for template, event in re.findall(r"^\| `(P\.spoke\.[^`]+)` \| (.*) \|$", section, re.M):
        pattern = re.escape(template).replace(r"\{spokeId\}", identifier)
        pattern = pattern.replace(r"\{sessionId\}", identifier)
        if r"\{lifecycle\}" in pattern:
            lifecycles = re.findall(r"`([a-z]+)`", event)
            pattern = pattern.replace(r"\{lifecycle\}", f"(?:{'|'.join(lifecycles)})")
        pattern = pattern.replace(r"\{kind\}", r"[a-z][a-z0-9_]{0,63}")
        alternatives.append(pattern.replace("P", "hub", 1))
    assert len(alternatives) == 2, "a lifecycle row and a signal row"
    return re.compile("|".join(f"(?:{a})" for a in alternatives))


def test_demo_spoke_publishes_what_the_contract_accepts(demo_spoke: ModuleType) -> None:
    subject_pattern = contract_inbound_subject()
    rng = random.Random(20261127)
    kinds: set[str] = set()
    endings: set[str] = set()
    for _ in range(30):
        sessions = demo_spoke.plan_round(rng, 3)
        sent: dict[str, list[str]] = {s.session_id: [] for s in sessions}
        for wave in demo_spoke.interleave(sessions):
            for session_id, step in wave:
                message = demo_spoke.build_message("hub", "demo", session_id, step)
                assert subject_pattern.fullmatch(message.subject), message.subject
                # The worker's own decoder: a dead letter would raise here.
                intake = decode("hub", message.subject, message.body)
                body = json.loads(message.body)
                assert message.headers == {"Nats-Msg-Id": body["eventId"]}
                assert str(intake.event.event_id) == body["eventId"]
                assert re.search(r"T\d\d:\d\d:\d\d(\.\d+)?([+-]\d\d:\d\d|Z)$", body["occurredAt"])
                sent[session_id].append(step.tail)
        for tails in sent.values():
            assert tails[:2] == ["spawned", "started"], tails
            assert tails[-1] == "archived", tails
            [ending] = [t for t in tails if t in ("completed", "failed", "aborted")]
            assert tails[-2] == ending
            endings.add(ending)
            kinds |= {t for t in tails if t.startswith("signal.")}
    assert kinds, "some sessions raise signals"
    assert {"completed", "failed"} <= endings


def test_demo_spoke_sessions_interleave(demo_spoke: ModuleType) -> None:
    sessions = demo_spoke.plan_round(random.Random(1), 3)
    assert len({s.session_id for s in sessions}) == 3
    first_wave = demo_spoke.interleave(sessions)[0]
    assert [step.tail for _, step in first_wave] == ["spawned"] * 3
    parents = {step.fields["parentSessionId"] for _, step in first_wave}
    assert len(parents) == 1, "one coordinator spawns the round's sessions"


# -- a compose client, when there is one ---------------------------------------------


def compose_client() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, timeout=30, check=False
        )
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


CONFIG_ARGS = ("--profile", "demo", "--profile", "observability", "config", "-q")


def run_compose_config(client: list[str], env_file: Path) -> subprocess.CompletedProcess[str]:
    # Only the env file speaks: the caller's own variables would take precedence.
    used = interpolations(COMPOSE_FILE.read_text(encoding="utf-8"))
    env = {key: value for key, value in os.environ.items() if key not in used}
    return subprocess.run(
        [*client, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), *CONFIG_ARGS],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_a_compose_client_accepts_the_file(tmp_path: Path) -> None:
    client = compose_client()
    if client is None:
        pytest.skip("no compose client (docker compose, docker-compose) installed")
    env_file = tmp_path / ".env"
    shutil.copy(ENV_EXAMPLE, env_file)
    result = run_compose_config(client, env_file)
    if result.returncode != 0 and re.search(r"daemon|docker\.sock", result.stderr, re.I):
        pytest.skip(f"{' '.join(client)} config wants an engine: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr

    # Without .env the stack refuses to start rather than use a blank password.
    empty = tmp_path / "empty.env"
    empty.write_text("", encoding="utf-8")
    result = run_compose_config(client, empty)
    assert result.returncode != 0
    assert "set it in .env" in result.stderr
