"""app/dependencies.py: one log line per change of state, never one per failed retry; the file /readyz reads."""

from __future__ import annotations

import logging

from app.dependencies import DependencyBoard, read_dependencies


def test_a_dependency_down_through_many_retries_logs_once(tmp_path, caplog):
    board = DependencyBoard(str(tmp_path / "dependencies.json"))
    with caplog.at_level(logging.INFO, "sira.dependencies"):
        assert board.mark_up("postgres") is True  # first sight: no line
        assert board.mark_down("postgres", "OperationalError: connection refused") is True
        for attempt in range(10):
            assert board.mark_down("postgres", f"OperationalError: refused ({attempt})") is False
        assert board.mark_up("postgres") is True
        assert board.mark_up("postgres") is False
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0] == "postgres is unreachable: OperationalError: connection refused"
    assert lines[1].startswith("postgres is reachable again")


def test_the_file_holds_each_state_and_the_latest_error(tmp_path):
    path = str(tmp_path / "dependencies.json")
    board = DependencyBoard(path)
    board.mark_up("model_store")
    board.mark_down("postgres", "first")
    board.mark_down("postgres", "second")
    shown = read_dependencies(path)
    assert shown["postgres"]["up"] is False and shown["postgres"]["last_error"] == "second"
    assert shown["model_store"] == {"up": True, "since": shown["model_store"]["since"], "last_error": None}
    assert shown["postgres"]["since"].endswith("Z")


def test_taking_over_continues_without_logging_again(tmp_path, caplog):
    path = str(tmp_path / "dependencies.json")
    DependencyBoard(path).mark_down("postgres", "refused")  # the master saw it first
    board = DependencyBoard(path)
    board.take_over()  # the supervisor
    caplog.clear()
    with caplog.at_level(logging.INFO, "sira.dependencies"):
        assert board.is_up("postgres") is False
        assert board.mark_down("postgres", "refused") is False
        assert board.mark_up("postgres") is True
    assert [record.getMessage()[:27] for record in caplog.records] == ["postgres is reachable again"]


def test_no_file_or_a_bad_file_shows_nothing(tmp_path):
    assert read_dependencies(None) == {}
    assert read_dependencies(str(tmp_path / "missing.json")) == {}
    bad = tmp_path / "bad.json"
    bad.write_text("{\"postgres\": 3}")
    assert read_dependencies(str(bad)) == {}
