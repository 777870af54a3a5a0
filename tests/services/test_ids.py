"""services.common.ids: version-7 UUIDs, time first."""

from __future__ import annotations

import time
import uuid

from services.common.ids import uuid7


def test_uuid7_is_a_version_7_rfc_uuid_with_the_time_first() -> None:
    before = time.time_ns() // 1_000_000
    made = uuid7()
    after = time.time_ns() // 1_000_000
    assert made.version == 7
    assert made.variant == uuid.RFC_4122
    assert before <= made.int >> 80 <= after
    assert uuid.UUID(str(made)) == made  # round-trips as text, as event ids travel


def test_later_ids_sort_after_earlier_ones_and_none_repeat() -> None:
    first = [uuid7() for _ in range(2000)]
    time.sleep(0.002)
    second = [uuid7() for _ in range(2000)]
    assert len({*first, *second}) == 4000
    assert max(first) < min(second)
    assert max(u.hex for u in first) < min(u.hex for u in second)  # as stored: hex text
    # within one millisecond the order is random (74 random bits), not a counter
    assert len({u.int & ((1 << 62) - 1) for u in first}) == 2000
