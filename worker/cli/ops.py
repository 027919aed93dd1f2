"""The operator commands of `hub-worker`: publish, alerts, detections, resolve, deadletters,
outbox, status.

`register(commands)` adds them to the `hub-worker` argument parser (its
sub-parsers action) and `await dispatch(args, settings, endpoints)` runs the one
chosen, returning the exit code:

- 0 done;
- 1 failed (a server unreachable, no worker answering, an unexpected reply);
- 2 usage (a bad or missing argument, a missing endpoint);
- 3 not found or refused (the resolve command's refusals, unknown dead letters, outbox
  rows that may not be republished).

Errors are one sentence on stderr, prefixed with the command; results go to
stdout. Database commands apply pending migrations first, like `accounts`.
`python -m worker.cli.ops …` runs them stand-alone against HUB_DATABASE_URL and
HUB_NATS_URL (no embedded servers).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence

from worker.cli import alerts, deadletters, detections, outbox, publish, status
from worker.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    CommandFailed,
    Endpoints,
    describe,
    error,
    load_settings,
    silence_stdout,
)
from worker.config import Settings


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the operator commands to the `hub-worker` parser's sub-commands."""
    publish.register(commands)
    alerts.register(commands)
    detections.register(commands)  # and resolve
    deadletters.register(commands)
    outbox.register(commands)
    status.register(commands)


async def dispatch(args: argparse.Namespace, settings: Settings, endpoints: Endpoints) -> int:
    """Run the operator command `args` was parsed for; returns the exit code."""
    command = str(getattr(args, "ops_command", None))
    handler = _HANDLERS.get(command)
    if handler is None:
        print(f"hub-worker: {command!r} is not an operator command", file=sys.stderr)
        return EXIT_USAGE
    try:
        return await handler(args, settings, endpoints)
    except CommandFailed as failed:
        error(command, failed.message)
        return failed.code
    except BrokenPipeError:
        # The reader went away (`| head`): nothing more to say to it.
        silence_stdout()
        return EXIT_OK
    except Exception as err:
        error(command, f"unexpected error: {describe(err)}")
        return EXIT_FAILURE


Handler = Callable[[argparse.Namespace, Settings, Endpoints], Awaitable[int]]


_HANDLERS: dict[str, Handler] = {
    "publish": publish.run_publish,
    "alerts": alerts.run_alerts,
    "detections": detections.run_detections,
    "resolve": detections.run_resolve,
    "deadletters": deadletters.run_deadletters,
    "outbox": outbox.run_outbox,
    "status": status.run_status,
}
COMMANDS = frozenset(_HANDLERS)


# The commands that read or write the database (the others need NATS only).
DATABASE_COMMANDS = frozenset({"detections", "deadletters", "outbox", "status"})


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m worker.cli.ops COMMAND …`: the operator commands without `hub-worker`'s
    embedded servers, against HUB_DATABASE_URL and HUB_NATS_URL."""
    parser = argparse.ArgumentParser(
        prog="hub-worker",
        description="Operator commands of the agent hub's coordination worker.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register(commands)
    args = parser.parse_args(argv)
    settings = load_settings()
    if settings is None:
        return EXIT_USAGE
    endpoints = Endpoints(settings.database_url or "", list(settings.nats_urls or []))
    return asyncio.run(dispatch(args, settings, endpoints))


if __name__ == "__main__":
    raise SystemExit(main())
