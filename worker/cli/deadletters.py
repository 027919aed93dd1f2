"""`hub-worker deadletters`: list the messages the worker could not apply, or replay them."""

from __future__ import annotations

import argparse
import base64
import json
import sys
from typing import Any

import asyncpg
import nats
import nats.errors
import nats.js.errors

from worker import db
from worker.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_REFUSED,
    CommandFailed,
    Endpoints,
    action_parser,
    command_parser,
    database,
    describe,
    error,
    listing_actions,
    nats_connection,
    stamp,
    table,
)
from worker.client import publishable_headers
from worker.config import Settings
from worker.domain import DeadLetterReason

DEADLETTERS_EPILOG = """\
examples:
  hub-worker deadletters                           # the 50 newest
  hub-worker deadletters --reason spoke_mismatch --limit 10
  hub-worker deadletters --json | jq -r '.[].payloadBase64' | head -1 | base64 -d
  hub-worker deadletters replay 17 18              # after fixing what made them fail
"""


REPLAY_EPILOG = """\
examples:
  hub-worker deadletters replay 17
  hub-worker deadletters replay 17 18 19

Republishes each dead letter's original bytes, with its stored headers, to its
original subject through JetStream. Replaying is safe: the worker recognises an
eventId it already applied and changes nothing, and a message that still cannot be
applied is dead-lettered again. The replay is recorded (replay_count) before it is
published, with Nats-Msg-Id deadletter-ID-replay-N, and confirmed (replayed_at)
once JetStream stored it; a replay that failed half-way is retried under the same
number, so running the command again does not publish it twice (within the
stream's 2-minute duplicate window; after that the worker's ledger still applies
it once). Runs under the runtime role (sql/grants.sql). Exit 3 when an id does
not exist (the others are still replayed).
"""


# How long a replay waits for the stream's ack, seconds.
REPLAY_ACK_TIMEOUT_SECONDS = 5.0
DEAD_LETTER_REASONS = tuple(reason.value for reason in DeadLetterReason)


def _reason_option(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "--reason", choices=DEAD_LETTER_REASONS, default=default, help="only this reason"
    )


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = command_parser(
        commands,
        "deadletters",
        "list dead letters, or replay them",
        "List the messages the worker could not apply (newest first), or replay them once "
        "their cause is fixed.",
        DEADLETTERS_EPILOG,
    )
    actions = listing_actions(parser, "dead letters", _reason_option)
    action_parser(
        actions,
        "replay",
        "republish dead letters to their original subjects",
        "Republish dead letters to their original subjects.",
        REPLAY_EPILOG,
    )


def _dead_letter_json(letter: db.DeadLetter) -> dict[str, Any]:
    return {
        "id": letter.id,
        "createdAt": letter.created_at.isoformat(),
        "reason": letter.reason,
        "subject": letter.subject,
        "error": letter.error,
        "deliveries": letter.deliveries,
        "headers": letter.headers,
        "payloadBase64": base64.b64encode(letter.payload).decode(),
        "replayedAt": letter.replayed_at.isoformat() if letter.replayed_at else None,
        "replayCount": letter.replay_count,
    }


async def run_deadletters(
    args: argparse.Namespace, settings: Settings, endpoints: Endpoints
) -> int:
    if args.action == "replay":
        return await _replay(args, settings, endpoints)
    async with database(endpoints) as conn:
        letters = await db.list_dead_letters(conn, reason=args.reason, limit=args.limit)
    if args.json:
        print(json.dumps([_dead_letter_json(letter) for letter in letters]))
        return EXIT_OK
    if not letters:
        print(
            "no dead letters" + (f" with reason {args.reason}" if args.reason else ""),
            file=sys.stderr,
        )
        return EXIT_OK
    rows = [
        [
            str(letter.id),
            stamp(letter.created_at),
            letter.reason,
            letter.subject,
            f"{letter.replay_count}x" if letter.replay_count else "-",
            " ".join(letter.error.split()),
        ]
        for letter in letters
    ]
    print(table(["ID", "CREATED", "REASON", "SUBJECT", "REPLAYED", "ERROR"], rows))
    return EXIT_OK


def replay_msg_id(dead_letter_id: int, replay: int) -> str:
    """The Nats-Msg-Id of replay number `replay` of a dead letter: the same for every
    attempt at one replay (JetStream drops a retry that finds the first one stored),
    distinct from the original message's and from other replays'."""
    return f"deadletter-{dead_letter_id}-replay-{replay}"


async def _replay(args: argparse.Namespace, settings: Settings, endpoints: Endpoints) -> int:
    ids = list(dict.fromkeys(args.ids))
    async with database(endpoints) as conn:
        letters = {letter.id: letter for letter in await db.dead_letters_by_id(conn, ids)}
        missing = [i for i in ids if i not in letters]
        if letters:
            async with nats_connection(endpoints, settings.nats_auth) as nc:
                js = nc.jetstream()
                for letter in letters.values():
                    # Recorded first: a publish that fails, or a confirmation that does,
                    # leaves the replay begun, and retrying it reuses its Nats-Msg-Id.
                    try:
                        replay = await db.begin_dead_letter_replay(conn, letter.id)
                    except asyncpg.InsufficientPrivilegeError as err:
                        raise CommandFailed(
                            EXIT_FAILURE,
                            f"cannot record the replay of dead letter {letter.id} ({err}), so "
                            "nothing was published: apply sql/grants.sql (`hub-worker migrate` "
                            "with HUB_DATABASE_RUNTIME_ROLE)",
                        ) from None
                    if replay is None:
                        missing.append(letter.id)
                        continue
                    msg_id = replay_msg_id(letter.id, replay)
                    headers = publishable_headers(letter.headers, msg_id)
                    headers["Hub-Replay-Of"] = str(letter.id)
                    try:
                        ack = await js.publish(
                            letter.subject,
                            letter.payload,
                            headers=headers,
                            timeout=REPLAY_ACK_TIMEOUT_SECONDS,
                        )
                    except nats.js.errors.NoStreamResponseError:
                        raise CommandFailed(
                            EXIT_FAILURE,
                            f"no stream captures {letter.subject}: has `hub-worker run` "
                            f"created {settings.events_stream} on this NATS?",
                        ) from None
                    except (TimeoutError, nats.errors.Error) as err:
                        raise CommandFailed(
                            EXIT_FAILURE,
                            f"replaying dead letter {letter.id} failed ({describe(err)}); "
                            "running the same replay again is safe",
                        ) from None
                    try:
                        await db.mark_dead_letter_replayed(conn, letter.id, replay)
                    except asyncpg.InsufficientPrivilegeError as err:
                        raise CommandFailed(
                            EXIT_FAILURE,
                            f"dead letter {letter.id} was republished but the replay could "
                            f"not be confirmed ({err}): apply sql/grants.sql (`hub-worker "
                            "migrate` with HUB_DATABASE_RUNTIME_ROLE); running the same "
                            "replay again is safe",
                        ) from None
                    again = " (already in the stream: a retried replay)" if ack.duplicate else ""
                    print(
                        f"replayed dead letter {letter.id} ({letter.reason}) to {letter.subject} "
                        f"as {ack.stream} #{ack.seq}, Nats-Msg-Id {msg_id}, replay {replay}"
                        f"{again}",
                        flush=True,
                    )
    for i in missing:
        error("deadletters", f"no dead letter with id {i}")
    return EXIT_REFUSED if missing else EXIT_OK
