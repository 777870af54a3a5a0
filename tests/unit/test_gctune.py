"""gateway.gctune: what the gateway and the services do to the collector at start-up."""

from __future__ import annotations

import gc

from gateway.gctune import YOUNG_THRESHOLD, tune_gc


def test_tune_gc_freezes_start_up_objects_and_raises_the_young_threshold() -> None:
    before = gc.get_threshold()
    try:
        survivor = [object() for _ in range(100)]  # alive at "start-up"
        tune_gc()
        assert gc.get_threshold()[0] == YOUNG_THRESHOLD > before[0]
        assert gc.get_freeze_count() >= len(survivor)
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
