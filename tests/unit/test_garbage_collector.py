"""`hub-worker run` collects garbage less often than Python's default and never walks
what start-up left (worker.cli.run.tune_garbage_collector)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from worker.cli.run import tune_garbage_collector
from worker.constants import GC_FIRST_GENERATION_OBJECTS


@pytest.fixture
def restored_collector() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("restored_collector")
def test_run_collects_after_many_allocations_and_freezes_start_up() -> None:
    _, older, oldest = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    tune_garbage_collector()
    assert gc.get_threshold() == (GC_FIRST_GENERATION_OBJECTS, older, oldest)
    assert gc.get_freeze_count() > 0
