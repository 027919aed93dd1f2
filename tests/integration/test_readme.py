"""The README's Python examples run as written, against a running worker.

Every ```python block is extracted and run as a script, with only the NATS URL pointed
at the test's server. The followers (blocks that `subscribe`) start first and must
print what the publishing blocks then cause; the others must finish with exit 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import signal
import sys
from pathlib import Path

import pytest

from tests.support import ROOT, open_hub, wait_until
from worker.config import Settings

pytestmark = pytest.mark.integration

README_URL = "nats://127.0.0.1:4222"


def python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


def durable_of(block: str) -> str:
    match = re.search(r'durable="([^"]+)"', block)
    assert match, block
    return match.group(1)


def test_the_readme_has_python_examples_with_one_durable_name_each() -> None:
    blocks = python_blocks()
    followers = [b for b in blocks if "subscribe(" in b]
    assert len(blocks) >= 3
    assert len(followers) >= 2
    names = [durable_of(b) for b in followers]
    assert len(set(names)) == len(names), names
    for block in blocks:
        compile(block, "README.md", "exec")  # top-level code only, no bare `await`


async def run_script(code: str, tmp: Path, name: str) -> asyncio.subprocess.Process:
    script = tmp / f"{name}.py"
    script.write_text(code)
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-u",
        str(script),
        cwd=tmp,
        env={k: v for k, v in os.environ.items() if not k.startswith("HUB_")},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_the_readme_examples_run_as_written(
    settings: Settings, database_url: str, nats_url: str, tmp_path: Path
) -> None:
    # The README's subjects and streams are the default prefix's.
    settings = dataclasses.replace(settings, subject_prefix="hub")
    blocks = [b.replace(README_URL, nats_url) for b in python_blocks()]
    followers = [b for b in blocks if "subscribe(" in b]
    publishers = [b for b in blocks if "subscribe(" not in b]
    async with open_hub(settings, database_url, nats_url, tmp_path) as hub:
        await hub.start_worker()
        running = [await run_script(b, tmp_path, f"follower{i}") for i, b in enumerate(followers)]
        try:

            async def following() -> bool:
                names = {c.name for c in await hub.js.consumers_info(settings.out_stream)}
                return all(durable_of(b) in names for b in followers)

            await wait_until(following, within=30, what="the followers' consumers")
            for i, block in enumerate(publishers):
                process = await run_script(block, tmp_path, f"publisher{i}")
                _, err = await asyncio.wait_for(process.communicate(), timeout=60)
                assert process.returncode == 0, (block, err.decode())
            await hub.settle()
            for process, block in zip(running, followers, strict=True):
                assert process.stdout is not None
                line = await asyncio.wait_for(process.stdout.readline(), timeout=30)
                assert b"high_error_count" in line.lower() or b"mapping:" in line, (block, line)
                assert process.returncode is None, "a follower keeps following"
        finally:
            for process in running:
                if process.returncode is None:
                    process.send_signal(signal.SIGINT)
            for process in running:
                _, err = await asyncio.wait_for(process.communicate(), timeout=30)
                # Ctrl-C ends a follower with KeyboardInterrupt, nothing else.
                assert b"KeyboardInterrupt" in err or not err.strip(), err.decode()
            for block in followers:
                await hub.js.delete_consumer(settings.out_stream, durable_of(block))
