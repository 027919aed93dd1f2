"""NATS credentials in Settings.from_env: what is accepted, and refusals that name the
variable but never print the secret."""

from __future__ import annotations

from pathlib import Path

import nkeys  # type: ignore[import-untyped]
import pytest

from tests.support.nats_jwt import Keys, creds, user_jwt
from worker.config import ConfigError, Settings

SECRET = "s3cret-Value-42"
USER = Keys.new(nkeys.PREFIX_BYTE_USER)
ACCOUNT = Keys.new(nkeys.PREFIX_BYTE_ACCOUNT)
CREDS = creds(user_jwt(ACCOUNT, USER, "worker"), USER.seed)
# Valid contents, so that two ways at once is the only thing wrong.
KEY_FILES = {"HUB_NATS_NKEY_SEED_FILE": USER.seed, "HUB_NATS_CREDS_FILE": CREDS}


def _file(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def _refusal(env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as refused:
        Settings.from_env(env)
    message = str(refused.value)
    assert SECRET not in message
    return message


@pytest.mark.parametrize("ending", ["\n", "\r\n", ""])
def test_a_password_file_is_read_without_its_line_ending(tmp_path: Path, ending: str) -> None:
    settings = Settings.from_env(
        {
            "HUB_NATS_USER": "hub-worker",
            "HUB_NATS_PASSWORD_FILE": _file(tmp_path, "password", f" {SECRET} {ending}"),
        }
    )
    # Only the line ending goes: spaces may be part of a password.
    assert settings.nats_auth.password == f" {SECRET} "
    assert SECRET not in repr(settings)


def test_a_token_file_is_read_and_kept_out_of_reprs(tmp_path: Path) -> None:
    settings = Settings.from_env({"HUB_NATS_TOKEN_FILE": _file(tmp_path, "token", f"{SECRET}\n")})
    assert settings.nats_auth.token == SECRET
    assert SECRET not in repr(settings)


def test_files_that_nats_py_reads_itself_are_passed_as_paths(tmp_path: Path) -> None:
    seed = _file(tmp_path, "user.nk", f"{USER.seed}\n")
    auth = Settings.from_env({"HUB_NATS_NKEY_SEED_FILE": seed}).nats_auth
    assert auth.nkey_seed_file == Path(seed)
    path = _file(tmp_path, "user.creds", CREDS)
    assert Settings.from_env({"HUB_NATS_CREDS_FILE": path}).nats_auth.creds_file == Path(path)


@pytest.mark.parametrize(
    ("variable", "contents", "complaint"),
    [
        ("HUB_NATS_NKEY_SEED_FILE", f"{SECRET}\n", "does not hold a valid NKey seed"),
        ("HUB_NATS_NKEY_SEED_FILE", ACCOUNT.seed, "holds an NKey seed, but not a user's"),
        # nats-py would hang reading a creds file without its JWT, and fail with a
        # TypeError on one without its seed: both are refused at start instead.
        ("HUB_NATS_CREDS_FILE", CREDS.split("\n\n", 1)[1], "has no NATS USER JWT block"),
        (
            "HUB_NATS_CREDS_FILE",
            CREDS.split("-----BEGIN USER NKEY SEED", 1)[0],
            "has no USER NKEY SEED block",
        ),
        ("HUB_NATS_CREDS_FILE", CREDS.replace(USER.seed, SECRET), "not hold a valid NKey seed"),
    ],
    ids=["seed-garbage", "seed-of-an-account", "creds-no-jwt", "creds-no-seed", "creds-bad-seed"],
)
def test_key_files_are_checked_at_start(
    tmp_path: Path, variable: str, contents: str, complaint: str
) -> None:
    path = _file(tmp_path, "key", contents)
    message = _refusal({variable: path})
    assert message.startswith(f"{variable}: {path} ")
    assert complaint in message
    assert USER.seed not in message
    assert ACCOUNT.seed not in message


@pytest.mark.parametrize(
    ("ways", "named"),
    [
        (
            {"HUB_NATS_USER": "hub-worker", "HUB_NATS_PASSWORD": SECRET, "HUB_NATS_TOKEN": SECRET},
            ["HUB_NATS_USER", "HUB_NATS_TOKEN[_FILE]"],
        ),
        (
            {"HUB_NATS_TOKEN_FILE": "token", "HUB_NATS_NKEY_SEED_FILE": "user.nk"},
            ["HUB_NATS_TOKEN[_FILE]", "HUB_NATS_NKEY_SEED_FILE"],
        ),
        (
            {"HUB_NATS_NKEY_SEED_FILE": "user.nk", "HUB_NATS_CREDS_FILE": "user.creds"},
            ["HUB_NATS_NKEY_SEED_FILE", "HUB_NATS_CREDS_FILE"],
        ),
    ],
)
def test_two_ways_to_authenticate_at_once_are_refused(
    tmp_path: Path, ways: dict[str, str], named: list[str]
) -> None:
    env = {
        name: _file(tmp_path, value, KEY_FILES.get(name, SECRET))
        if name.endswith("_FILE")
        else value
        for name, value in ways.items()
    }
    message = _refusal(env)
    assert message.startswith("choose one way to authenticate to NATS")
    assert all(name in message for name in named), message


@pytest.mark.parametrize(
    "env",
    [
        {"HUB_NATS_USER": "hub-worker"},
        {"HUB_NATS_PASSWORD": SECRET},
    ],
    ids=["user-without-password", "password-without-user"],
)
def test_user_and_password_go_together(env: dict[str, str]) -> None:
    assert _refusal(env) == "HUB_NATS_USER and HUB_NATS_PASSWORD[_FILE] go together"


@pytest.mark.parametrize(
    "variable",
    [
        "HUB_NATS_PASSWORD_FILE",
        "HUB_NATS_TOKEN_FILE",
        "HUB_NATS_NKEY_SEED_FILE",
        "HUB_NATS_CREDS_FILE",
        "HUB_NATS_TLS_CA_FILE",
        "HUB_NATS_TLS_CERT_FILE",
        "HUB_NATS_TLS_KEY_FILE",
    ],
)
def test_a_file_that_does_not_exist_is_named(tmp_path: Path, variable: str) -> None:
    missing = tmp_path / "not-there"
    # With a user the password file is the only thing wrong.
    user = {"HUB_NATS_USER": "hub-worker"} if variable == "HUB_NATS_PASSWORD_FILE" else {}
    message = _refusal({**user, variable: str(missing)})
    assert message == f"{variable}: no such file {str(missing)!r}"


@pytest.mark.parametrize("name", ["HUB_NATS_TOKEN", "HUB_NATS_PASSWORD"])
def test_a_secret_and_its_file_at_once_are_refused(tmp_path: Path, name: str) -> None:
    env = {name: SECRET, f"{name}_FILE": _file(tmp_path, "secret", f"{SECRET}\n")}
    assert _refusal(env) == f"set {name} or {name}_FILE, not both"


@pytest.mark.parametrize("contents", ["", "\n"])
def test_an_empty_secret_file_is_refused(tmp_path: Path, contents: str) -> None:
    path = _file(tmp_path, "token", contents)
    assert _refusal({"HUB_NATS_TOKEN_FILE": path}) == f"HUB_NATS_TOKEN_FILE: {path} is empty"


def test_a_client_key_needs_its_certificate(tmp_path: Path) -> None:
    env = {"HUB_NATS_TLS_KEY_FILE": _file(tmp_path, "client.key", SECRET)}
    assert _refusal(env) == "HUB_NATS_TLS_KEY_FILE needs HUB_NATS_TLS_CERT_FILE"


@pytest.mark.parametrize("prefix", ["_INBOX.>", "_INBOX..x", "inbox prefix"])
def test_an_inbox_prefix_must_be_subject_tokens(prefix: str) -> None:
    assert "HUB_NATS_INBOX_PREFIX" in _refusal({"HUB_NATS_INBOX_PREFIX": prefix})
