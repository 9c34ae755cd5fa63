"""Hash-chained audit log: appends read back, and any edit, deletion or reordering is detected."""

from __future__ import annotations

import json

import pytest

from medveil.runtime.audit import (
    GENESIS,
    AuditError,
    AuditLog,
    _entry_hash,
    read_audit_log,
    verify_audit_log,
)


@pytest.fixture
def log_path(tmp_path):
    path = tmp_path / "state" / "audit.jsonl"
    log = AuditLog(path, "site_a")
    log.append("approval", study="s1", datasets={"default": ["age", "sex"]})
    log.append("request", study="s1", task="t1", round=0, nonce="n1")
    log.append("decision", decision="run", task="t1", variables=["age"])
    log.append("release", task="t1", arrays={"n": [1]}, public={"rows": 12})
    log.append("refusal", rule="min_cell_count", detail="too few rows")
    return path


def lines(path):
    return path.read_text(encoding="utf-8").splitlines()


def write(path, new_lines):
    path.write_text("".join(line + "\n" for line in new_lines), encoding="utf-8")


def test_append_returns_ids_and_reads_back(tmp_path):
    path = tmp_path / "nested" / "dir" / "audit.jsonl"
    log = AuditLog(path, "site_b")
    first = log.append("request", study="s", round=0)
    second = log.append("refusal", rule="replay", detail="seen")
    assert (first, second) == ("site_b:1", "site_b:2")
    entries = read_audit_log(path)
    assert [e["seq"] for e in entries] == [1, 2]
    assert [e["id"] for e in entries] == [first, second]
    assert [e["kind"] for e in entries] == ["request", "refusal"]
    assert entries[0]["study"] == "s" and entries[0]["round"] == 0
    assert entries[1]["rule"] == "replay" and entries[1]["detail"] == "seen"
    assert entries[0]["prev"] == GENESIS
    assert entries[1]["prev"] == entries[0]["hash"]
    assert all(e["hash"] == _entry_hash(e) for e in entries)
    assert len(lines(path)) == 2


def test_clean_log_verifies(log_path):
    assert verify_audit_log(log_path) == 5


def test_empty_log_verifies(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_text("")
    assert verify_audit_log(path) == 0


@pytest.mark.parametrize("index", range(5))
def test_edited_line_is_detected(log_path, index):
    content = lines(log_path)
    entry = json.loads(content[index])
    entry["kind"] = "forged"
    content[index] = json.dumps(entry, sort_keys=True)
    write(log_path, content)
    with pytest.raises(AuditError, match=f"entry {index + 1}"):
        verify_audit_log(log_path)


@pytest.mark.parametrize("index", range(4))
def test_edited_line_with_recomputed_hash_breaks_the_next_link(log_path, index):
    content = lines(log_path)
    entry = json.loads(content[index])
    entry["detail"] = "rewritten history"
    entry["hash"] = _entry_hash(entry)
    content[index] = json.dumps(entry, sort_keys=True)
    write(log_path, content)
    with pytest.raises(AuditError, match=f"entry {index + 2}"):
        verify_audit_log(log_path)


def test_edited_nested_value_is_detected(log_path):
    content = lines(log_path)
    content[3] = content[3].replace('"rows": 12', '"rows": 13')
    assert '"rows": 13' in content[3]
    write(log_path, content)
    with pytest.raises(AuditError):
        verify_audit_log(log_path)


@pytest.mark.parametrize("index", range(4))  # dropping the last line leaves a valid (shorter) chain
def test_deleted_line_is_detected(log_path, index):
    content = lines(log_path)
    del content[index]
    write(log_path, content)
    with pytest.raises(AuditError):
        verify_audit_log(log_path)


@pytest.mark.parametrize("i, j", [(0, 1), (1, 3), (3, 4), (0, 4)])
def test_reordered_lines_are_detected(log_path, i, j):
    content = lines(log_path)
    content[i], content[j] = content[j], content[i]
    write(log_path, content)
    with pytest.raises(AuditError):
        verify_audit_log(log_path)


def test_duplicated_line_is_detected(log_path):
    content = lines(log_path)
    content.insert(2, content[1])
    write(log_path, content)
    with pytest.raises(AuditError):
        verify_audit_log(log_path)


def test_corrupted_line_is_reported_as_audit_error(log_path):
    """A line that is no longer JSON is an altered log; `medveil audit verify` only catches AuditError."""
    content = lines(log_path)
    content[2] = content[2][: len(content[2]) // 2]
    write(log_path, content)
    with pytest.raises(AuditError):
        verify_audit_log(log_path)


def test_reopening_continues_the_chain(log_path):
    before = read_audit_log(log_path)
    reopened = AuditLog(log_path, "site_a")
    new_id = reopened.append("request", study="s1", task="t2", round=0)
    reopened.append("release", task="t2")
    assert new_id == f"site_a:{len(before) + 1}"
    after = read_audit_log(log_path)
    assert after[: len(before)] == before
    assert [e["seq"] for e in after] == list(range(1, len(before) + 3))
    assert after[len(before)]["prev"] == before[-1]["hash"]
    assert verify_audit_log(log_path) == len(before) + 2


def test_reopening_an_empty_file_starts_at_genesis(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.touch()
    AuditLog(path, "site_c").append("request")
    (entry,) = read_audit_log(path)
    assert entry["seq"] == 1 and entry["prev"] == GENESIS
    assert verify_audit_log(path) == 1
