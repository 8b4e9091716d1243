"""log.py, the whole logging pipeline: line shape, level filter, redaction, capture()."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from wrapguard import log


@pytest.fixture
def logfile(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "wg.log"
    log.setup("info", str(path))
    yield path
    log.setup()


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_line_is_timestamp_level_message_then_the_fields(logfile: Path) -> None:
    log.get("wrapguard.test").warning("peer moved", peer=1, new="10.0.0.1:51820")
    (line,) = lines(logfile)
    assert list(line) == ["timestamp", "level", "message", "peer", "new"]
    assert line["level"] == "warn" and line["message"] == "peer moved"
    assert isinstance(line["timestamp"], str) and line["timestamp"].endswith("Z")


def test_levels_below_the_threshold_are_dropped(logfile: Path) -> None:
    logger = log.get()
    logger.debug("not shown")
    logger.info("shown")
    logger.error("shown too")
    assert [(ln["level"], ln["message"]) for ln in lines(logfile)] == [
        ("info", "shown"),
        ("error", "shown too"),
    ]


def test_fields_named_like_secrets_are_redacted(logfile: Path) -> None:
    log.get().info("x", private_key="k", channel_secret="s", token_id=3, peer="p")
    (line,) = lines(logfile)
    assert line["private_key"] == line["channel_secret"] == line["token_id"] == "<redacted>"
    assert line["peer"] == "p"


def test_a_field_named_event_is_a_field(logfile: Path) -> None:
    # The engine's "one flow's bug must not stop the others" handler logs event=<type>.
    log.get().error("flow event failed", event="Closed", error="boom")
    (line,) = lines(logfile)
    assert line["message"] == "flow event failed" and line["event"] == "Closed"


def test_capture_sees_every_level_and_writes_nothing(logfile: Path) -> None:
    with log.capture() as events:
        log.get().debug("quiet", n=1)
    assert events == [{"n": 1, "event": "quiet", "log_level": "debug"}]
    assert logfile.read_text() == ""
