"""JsonLinesWriter: whole lines under concurrency, rotation, back-pressure and draining."""

from __future__ import annotations

import asyncio
import gzip
import re
import threading
import time
from pathlib import Path

import orjson
import pytest

from gateway.txlog import JsonLinesWriter, LogQueueFull, LogWriterClosed
from gateway.txlog.writer import STALL_GRACE_S, LogFileUnavailable, LogWriterStalled


def line(**fields: object) -> bytes:
    return orjson.dumps(fields, option=orjson.OPT_APPEND_NEWLINE)


def read_all(directory: Path, name: str = "tx") -> list[bytes]:
    """Every line, oldest first: rotated files sort by their UTC stamp, then the live file."""
    lines: list[bytes] = []
    for rotated in sorted(directory.glob(f"{name}-*.jsonl.gz")):
        lines += gzip.decompress(rotated.read_bytes()).splitlines(keepends=True)
    live = directory / f"{name}.jsonl"
    if live.exists():
        lines += live.read_bytes().splitlines(keepends=True)
    return lines


async def test_concurrent_tasks_write_whole_lines(tmp_path: Path) -> None:
    writer = JsonLinesWriter(tmp_path / "tx.jsonl")
    writer.start()

    async def payer(task: int) -> None:
        for seq in range(100):
            writer.write(line(task=task, seq=seq, pad="x" * (task * 7 % 300)))
            await asyncio.sleep(0)  # interleave with the other tasks

    await asyncio.gather(*(payer(t) for t in range(50)))
    assert await writer.wait_flushed()
    await writer.aclose()

    lines = read_all(tmp_path)
    assert all(raw.endswith(b"\n") for raw in lines)
    entries = [orjson.loads(raw) for raw in lines]
    assert len(entries) == 5000
    expected = {(task, seq) for task in range(50) for seq in range(100)}
    assert {(e["task"], e["seq"]) for e in entries} == expected
    for task in range(50):  # one producer's lines keep their order
        seqs = [e["seq"] for e in entries if e["task"] == task]
        assert seqs == sorted(seqs)


def test_size_rotation_compresses_and_never_splits_a_line(tmp_path: Path) -> None:
    max_bytes = 4096
    writer = JsonLinesWriter(tmp_path / "tx.jsonl", max_bytes=max_bytes)
    writer.start()
    written = [line(seq=seq, pad="y" * (seq % 97)) for seq in range(2000)]
    for i, raw in enumerate(written):
        writer.write(raw)
        if i % 300 == 0:
            assert writer.flush_barrier(5)  # rotate across several batches, not just one
    writer.close()

    rotated = sorted(tmp_path.glob("tx-*.jsonl.gz"))
    assert len(rotated) >= 10
    assert not list(tmp_path.glob("tx-*.jsonl")) and not list(tmp_path.glob("*.tmp"))
    for path in rotated:
        content = gzip.decompress(path.read_bytes())
        assert 0 < len(content) <= max_bytes and content.endswith(b"\n")
        assert re.fullmatch(r"tx-\d{8}T\d{12}\.jsonl\.gz", path.name)
    assert read_all(tmp_path) == written  # nothing lost, duplicated, reordered or split


def test_line_larger_than_max_bytes_gets_a_file_of_its_own(tmp_path: Path) -> None:
    writer = JsonLinesWriter(tmp_path / "tx.jsonl", max_bytes=100, compress_rotated=False)
    writer.start()
    small, big = line(n=1), line(pad="z" * 500)
    for raw in (small, big, small):
        writer.write(raw)
    writer.close()

    rotated = sorted(tmp_path.glob("tx-*.jsonl"))
    assert [p.read_bytes() for p in rotated] == [small, big]
    assert (tmp_path / "tx.jsonl").read_bytes() == small


def test_time_rotation(tmp_path: Path) -> None:
    writer = JsonLinesWriter(tmp_path / "tx.jsonl", rotate_interval_s=0.05)
    writer.start()
    first, second = line(n=1), line(n=2)
    writer.write(first)
    assert writer.flush_barrier(5)
    time.sleep(0.1)  # the interval itself must pass; no event stands for it
    assert writer.flush_barrier(5)
    writer.write(second)
    writer.close()

    rotated = sorted(tmp_path.glob("tx-*.jsonl.gz"))
    assert gzip.decompress(rotated[0].read_bytes()) == first
    assert read_all(tmp_path) == [first, second]  # a slow machine may rotate once more


def test_full_queue_refuses_and_counts(tmp_path: Path) -> None:
    writer = JsonLinesWriter(tmp_path / "tx.jsonl", queue_size=1)  # thread not started
    assert writer.has_capacity()
    writer.write(line(n=1))
    assert not writer.has_capacity()
    with pytest.raises(LogQueueFull):
        writer.write(line(n=2))
    with pytest.raises(LogQueueFull):
        writer.write(line(n=3))
    assert writer.dropped == 2

    writer.close()  # starts the thread to drain what was accepted
    assert (tmp_path / "tx.jsonl").read_bytes() == line(n=1)


def test_has_capacity_keeps_a_reserve(tmp_path: Path) -> None:
    writer = JsonLinesWriter(tmp_path / "tx.jsonl", queue_size=4)
    for n in range(2):
        writer.write(line(n=n))
    assert writer.has_capacity(reserve=1)  # 2 free > 1
    assert not writer.has_capacity(reserve=2)
    writer.close()
    assert not writer.has_capacity()


def test_close_drains_everything_and_is_idempotent(tmp_path: Path) -> None:
    writer = JsonLinesWriter(tmp_path / "tx.jsonl")
    writer.start()
    written = [line(seq=seq) for seq in range(5000)]
    for raw in written:
        writer.write(raw)
    writer.close()
    writer.close()

    assert read_all(tmp_path) == written
    assert writer.flush_barrier(1)
    with pytest.raises(LogWriterClosed):
        writer.write(line(late=True))


def test_missing_newline_is_added_and_a_torn_last_line_is_ended(tmp_path: Path) -> None:
    path = tmp_path / "tx.jsonl"
    path.write_bytes(b'{"n":0}\n{"torn":')  # what a crash mid-write leaves
    writer = JsonLinesWriter(path)
    writer.start()
    writer.write(b'{"n":1}')
    writer.close()
    assert path.read_bytes() == b'{"n":0}\n{"torn":\n{"n":1}\n'


def test_flush_barrier_times_out_when_the_thread_never_started(tmp_path: Path) -> None:
    writer = JsonLinesWriter(tmp_path / "tx.jsonl")
    writer.write(line(n=1))
    assert not writer.flush_barrier(timeout=0.05)
    writer.close()
    assert (tmp_path / "tx.jsonl").read_bytes() == line(n=1)


# --- a log that cannot be written is noticed ---------------------------------------------------


def test_open_names_the_file_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "plain").write_bytes(b"x")
    with pytest.raises(LogFileUnavailable) as err:
        JsonLinesWriter(tmp_path / "plain" / "logs" / "tx.jsonl").open()
    assert err.value.problem == f"{tmp_path / 'plain'} is not a directory"
    (tmp_path / "tx.jsonl").mkdir()
    with pytest.raises(LogFileUnavailable, match="Is a directory"):
        JsonLinesWriter(tmp_path / "tx.jsonl").open()


def _replace_with_directory(path: Path) -> Path:
    """What an operator (or a broken deploy) does to the log: the file moved away, a directory
    where it was. The writer's open descriptor still writes happily into the moved file."""
    moved = path.with_name("moved-away.jsonl")
    path.rename(moved)
    path.mkdir()
    return moved


def test_a_log_file_replaced_under_the_writer_is_noticed_and_nothing_reported_is_lost(tmp_path: Path) -> None:
    path = tmp_path / "tx.jsonl"
    reported: list[int] = []
    all_durable = threading.Event()
    writer = JsonLinesWriter(path)

    def listener(seq: int) -> None:
        reported.append(seq)
        if seq == 30:
            all_durable.set()

    writer.set_flush_listener(listener)
    writer.open()
    writer.start()
    for n in range(10):
        writer.write(line(n=n))
    assert writer.flush_barrier(5) and writer.healthy

    moved = _replace_with_directory(path)
    for n in range(10, 20):
        writer.write(line(n=n))
    started = time.monotonic()
    assert not writer.flush_barrier(5)  # released as "not flushed" as soon as the check fails
    assert time.monotonic() - started < 2
    assert not writer.healthy
    assert writer.problem == f"cannot write {path}: Is a directory"
    assert writer.write_errors > 0 and reported[-1] == 10  # lines 11-20 not reported durable
    assert not writer.flush_barrier(5)  # and no one waits for a disk that is failing

    path.rmdir()  # fixed: the writer opens a new file at the path
    for n in range(20, 30):
        writer.write(line(n=n))
    assert all_durable.wait(5)
    assert writer.healthy and writer.problem is None
    writer.close()
    assert path.read_bytes() == b"".join(line(n=n) for n in range(10, 30))  # the unreported ones again
    assert moved.read_bytes().startswith(b"".join(line(n=n) for n in range(10)))


def test_close_is_bounded_while_the_disk_fails_and_says_what_was_not_written(tmp_path: Path) -> None:
    path = tmp_path / "tx.jsonl"
    writer = JsonLinesWriter(path)
    writer.set_flush_listener(lambda _seq: None)
    writer.open()
    writer.start()
    _replace_with_directory(path)
    for n in range(5):
        writer.write(line(n=n))
    assert not writer.flush_barrier(5)
    started = time.monotonic()
    with pytest.raises(LogWriterStalled) as err:
        writer.close(timeout=30)
    assert time.monotonic() - started < STALL_GRACE_S + 2
    assert (err.value.unwritten, err.value.problem) == (5, "Is a directory")
    assert str(err.value) == f"{path}: 5 line(s) not written: Is a directory"
    assert not writer.healthy


def test_a_log_file_removed_while_idle_is_created_again(tmp_path: Path) -> None:
    path = tmp_path / "tx.jsonl"
    durable = threading.Event()
    writer = JsonLinesWriter(path)
    writer.set_flush_listener(lambda seq: durable.set() if seq == 2 else None)
    writer.open()
    writer.start()
    writer.write(line(n=1))
    assert writer.flush_barrier(5)
    path.unlink()
    writer.write(line(n=2))
    assert durable.wait(5)
    writer.close()
    assert path.read_bytes() == line(n=2)
