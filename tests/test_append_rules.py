"""The rules of an append, without a backend: what a request may store on an upload."""

from __future__ import annotations

import pytest

from uploadsrv.core import errors as e
from uploadsrv.core.model import UploadInfo
from uploadsrv.core.rules import REPLAY, AppendPlan, AppendRequest, plan_append

MAX = 1000


def upload(length: int | None, offset: int, **kind: object) -> UploadInfo:
    return UploadInfo(id="0" * 32, length=length, offset=offset, **kind)  # type: ignore[arg-type]


def test_a_body_may_fill_the_rest_of_the_upload() -> None:
    assert plan_append(upload(100, 40), AppendRequest(40, 60), MAX) == AppendPlan(length=100, limit=60)


def test_a_deferred_length_limits_the_body_to_the_maximum_size() -> None:
    assert plan_append(upload(None, 40), AppendRequest(40), MAX) == AppendPlan(length=None, limit=960)


def test_a_final_body_declares_the_deferred_length() -> None:
    plan = plan_append(upload(None, 40), AppendRequest(40, 10, complete=True), MAX)
    assert plan == AppendPlan(length=50, limit=10)


def test_the_wrong_offset_is_a_mismatch_that_tells_the_real_one() -> None:
    with pytest.raises(e.OffsetMismatch) as caught:
        plan_append(upload(100, 40), AppendRequest(30), MAX)
    assert caught.value.expected == 40


def test_a_repeated_final_request_is_replayed() -> None:
    assert plan_append(upload(100, 100), AppendRequest(100, 0, complete=True), MAX) is REPLAY


def test_a_finished_upload_replays_a_conflicting_request_only_when_asked() -> None:
    with pytest.raises(e.OffsetMismatch):
        plan_append(upload(100, 100), AppendRequest(20, 80), MAX)
    assert plan_append(upload(100, 100), AppendRequest(20, 80, replay_finished=True), MAX) is REPLAY
    with pytest.raises(e.UploadComplete):
        plan_append(upload(100, 100), AppendRequest(100, 5), MAX)
    assert plan_append(upload(100, 100), AppendRequest(100, 5, replay_finished=True), MAX) is REPLAY


def test_a_body_past_the_end_is_too_large() -> None:
    with pytest.raises(e.TooLarge):
        plan_append(upload(100, 40), AppendRequest(40, 61), MAX)


def test_a_declared_length_may_not_change_or_undercut_what_is_stored() -> None:
    with pytest.raises(e.LengthConflict):
        plan_append(upload(100, 40), AppendRequest(40, length=90), MAX)
    with pytest.raises(e.LengthConflict):
        plan_append(upload(None, 40), AppendRequest(40, length=30), MAX)
    with pytest.raises(e.TooLarge):
        plan_append(upload(None, 40), AppendRequest(40, length=MAX + 1), MAX)


@pytest.mark.parametrize("kind", [{"parts": ["a"]}, {"chunk_size": 10}])
def test_concatenations_and_chunk_sessions_take_no_appends(kind: dict[str, object]) -> None:
    with pytest.raises(e.NotAppendable):
        plan_append(upload(100, 0, **kind), AppendRequest(0, 10), MAX)
