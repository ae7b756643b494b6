"""The infill receiver's durable queue: round trips, restarts, rotation, damaged files, a real kill -9, threads."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otel_tracegen.infill import queue as queue_mod
from otel_tracegen.infill.queue import HEADER, DiskQueue, QueueClosed, QueueFull, QueueLocked

ROOT = Path(__file__).resolve().parents[1]


def segments(directory: Path, name: str = "queue") -> list[Path]:
    return sorted(directory.glob(f"{name}-*.seg"))


def test_round_trip_and_acks(tmp_path):
    with DiskQueue(tmp_path) as q:
        seqs = [q.append(p) for p in (b"a", b"bb", b"")]
        assert seqs == [0, 1, 2]
        assert q.append_many([b"c", bytearray(b"d"), memoryview(b"e")]) == [3, 4, 5]
        assert q.pending() == [(0, b"a"), (1, b"bb"), (2, b""), (3, b"c"), (4, b"d"), (5, b"e")]
        assert q.next() == (0, b"a")
        assert q.next(after=0) == (1, b"bb")
        assert q.next(after=5) is None
        q.ack(1)
        q.ack(1)  # idempotent
        q.ack_many([0, 3, 3])
        assert q.next() == (2, b"")
        assert q.next(after=2) == (4, b"d")
        assert q.pending_seqs() == [2, 4, 5]
        assert q.get(4) == b"d" and q.get(0) is None
        for bad in (6, 100, -1):
            with pytest.raises(ValueError, match="unknown sequence number"):
                q.ack(bad)
        with pytest.raises(ValueError):
            q.ack_many([2, 99])  # checked before anything is acked
        assert q.pending_seqs() == [2, 4, 5]
        assert len(q) == 3
        s = q.stats()
        assert (s.records, s.bytes, s.appended, s.acked, s.recovered, s.truncated_bytes) == (3, 2, 6, 3, 0, 0)
        with pytest.raises(TypeError):
            q.append("text")  # type: ignore[arg-type]
    assert q.closed
    with pytest.raises(QueueClosed):
        q.append(b"x")
    q.close()  # idempotent


def test_append_fsyncs_once_per_call(tmp_path, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    with DiskQueue(tmp_path) as q:
        q.append(b"first")  # creates the segment: file + directory
        calls.clear()
        q.append(b"x")
        assert len(calls) == 1
        calls.clear()
        q.append_many([b"p%d" % i for i in range(50)])
        assert len(calls) == 1
    calls.clear()
    with DiskQueue(tmp_path, fsync=False) as q:
        q.append_many([b"y", b"z"])
        q.ack(0)
    assert calls == []


def test_restart_keeps_unacked_and_continues_seqs(tmp_path):
    with DiskQueue(tmp_path) as q:
        for i in range(6):
            q.append(b"r%d" % i)
        q.ack_many([1, 3, 4])
    with DiskQueue(tmp_path) as q:
        assert q.pending() == [(0, b"r0"), (2, b"r2"), (5, b"r5")]
        assert q.stats().recovered == 3 and q.stats().bytes == 6
        assert q.append(b"r6") == 6
        q.ack(0)
        q.ack(0)
    with DiskQueue(tmp_path) as q:
        assert q.pending_seqs() == [2, 5, 6]


def test_seqs_never_reused_when_every_segment_is_gone(tmp_path):
    with DiskQueue(tmp_path) as q:
        q.append_many([b"a", b"b", b"c"])
        q.ack_many([0, 1, 2])
    for path in segments(tmp_path):
        path.unlink()
    with DiskQueue(tmp_path) as q:
        assert q.pending() == []
        assert q.append(b"d") == 3
    # Without the .next file, the acks still hold the sequence numbers back.
    with DiskQueue(tmp_path) as q:
        q.ack(3)
        q.append(b"e")  # 4, in the same segment as 3 (still holds an ack for 3)
    (tmp_path / "queue.next").unlink()
    with DiskQueue(tmp_path) as q:
        assert q.pending_seqs() == [4]
        assert q.append(b"f") == 5
    # A damaged .next file is ignored with a warning; the segments still give the next number.
    (tmp_path / "queue.next").write_bytes(b"garbage")
    with DiskQueue(tmp_path) as q:
        assert q.append(b"g") == 6


def test_rotation_deletes_fully_acked_segments(tmp_path):
    # 50-byte payloads are 70-byte records: two never fit in 100 bytes, so one segment each.
    with DiskQueue(tmp_path, segment_bytes=100) as q:
        seqs = [q.append(bytes([i]) * 50) for i in range(5)]
        files = segments(tmp_path)
        assert [f.name for f in files] == [f"queue-{s:016d}.seg" for s in seqs]
        assert all(f.stat().st_size == HEADER.size + 50 for f in files)
        q.ack_many([0, 2])
        assert not files[0].exists() and not files[2].exists()
        assert files[1].exists()
        q.ack(4)  # the active segment stays, for the next append
        assert files[4].exists()
        assert q.stats().segments == 3
        assert (tmp_path / "queue.acks").stat().st_size == 3 * 8
        q.append(b"x" * 50)  # rotates: the fully acked former active segment goes
        assert not files[4].exists()
    # On open the ack file keeps only acks of records in live segments: here none.
    with DiskQueue(tmp_path, segment_bytes=100) as q:
        assert q.pending_seqs() == [1, 3, 5]
    assert (tmp_path / "queue.acks").stat().st_size == 0

    # Several records per segment; ack one of a segment's two: its ack survives compaction.
    with DiskQueue(tmp_path, segment_bytes=100, name="two") as q:
        assert q.append_many([b"a" * 10, b"b" * 10]) == [0, 1]  # 60 bytes
        q.append(b"c" * 10)  # would be 90: still fits
        q.append(b"d" * 10)  # 120 > 100: a new segment
        assert len(segments(tmp_path, "two")) == 2
        q.ack(1)
    with DiskQueue(tmp_path, segment_bytes=100, name="two") as q:
        assert q.pending_seqs() == [0, 2, 3]
    assert (tmp_path / "two.acks").read_bytes() == (1).to_bytes(8, "little")


def test_fully_acked_segment_left_by_a_crash_is_deleted_on_open(tmp_path):
    with DiskQueue(tmp_path, segment_bytes=100) as q:
        for i in range(3):
            q.append(bytes([i]) * 50)
        first = segments(tmp_path)[0]
        saved = first.read_bytes()
        q.ack(0)
        assert not first.exists()
        first.write_bytes(saved)  # as if the process died between writing the ack and deleting the file
    with DiskQueue(tmp_path, segment_bytes=100) as q:
        assert q.pending_seqs() == [1, 2]
        assert not first.exists()
    assert (tmp_path / "queue.acks").stat().st_size == 0


def test_ack_file_compacts_while_running(tmp_path, monkeypatch):
    monkeypatch.setattr(DiskQueue, "_ACK_COMPACT_MIN", 16)
    with DiskQueue(tmp_path, segment_bytes=64, fsync=False) as q:
        for i in range(200):
            q.ack(q.append(b"%03d" % i))
            assert (tmp_path / "queue.acks").stat().st_size <= 64 * 8
        keep = q.append(b"keep")
    with DiskQueue(tmp_path, segment_bytes=64) as q:
        assert q.pending() == [(keep, b"keep")]
        assert q.append(b"after") == keep + 1


def _three_records(directory: Path) -> int:
    with DiskQueue(directory) as q:
        q.append_many([bytes([65 + i]) * 100 for i in range(3)])
    return HEADER.size + 100


def test_torn_tail_is_truncated(tmp_path, caplog):
    record = _three_records(tmp_path)
    (seg,) = segments(tmp_path)
    with open(seg, "r+b") as f:
        f.truncate(3 * record - 30)  # the third record's last 30 bytes never made it
    with caplog.at_level(logging.WARNING, logger=queue_mod.__name__):
        q = DiskQueue(tmp_path)
    with q:
        assert q.pending() == [(0, b"A" * 100), (1, b"B" * 100)]
        assert q.stats().truncated_bytes == record - 30
        assert q.stats().recovered == 2
        assert seg.stat().st_size == 2 * record
        assert "torn record at offset 240" in caplog.text and seg.name in caplog.text
        new = q.append(b"new")
        assert new > 1
    with DiskQueue(tmp_path) as q:
        assert q.pending() == [(0, b"A" * 100), (1, b"B" * 100), (new, b"new")]
        assert q.stats().truncated_bytes == 0


def test_torn_header_and_zero_tail(tmp_path):
    record = _three_records(tmp_path)
    (seg,) = segments(tmp_path)
    with open(seg, "r+b") as f:
        f.truncate(2 * record + 7)  # part of a header
    with DiskQueue(tmp_path) as q:
        assert q.pending_seqs() == [0, 1] and q.stats().truncated_bytes == 7
    with open(seg, "ab") as f:
        f.write(bytes(500))  # a power loss: the size reached the disk, the data did not
    with DiskQueue(tmp_path) as q:
        assert q.pending_seqs() == [0, 1]
        q.append(b"x")
        assert q.stats().truncated_bytes == 500
    assert seg.stat().st_size == 2 * record  # cut back; the new record went to a segment of its own
    assert len(segments(tmp_path)) == 2


def test_flipped_byte_in_last_record_is_truncated(tmp_path):
    record = _three_records(tmp_path)
    (seg,) = segments(tmp_path)
    data = bytearray(seg.read_bytes())
    data[2 * record + HEADER.size + 50] ^= 0xFF
    seg.write_bytes(bytes(data))
    with DiskQueue(tmp_path) as q:
        assert q.pending() == [(0, b"A" * 100), (1, b"B" * 100)]
        assert q.stats().truncated_bytes == record
        new = q.append(b"new")
    with DiskQueue(tmp_path) as q:
        assert q.pending_seqs() == [0, 1, new]


def test_corruption_inside_the_last_segment_is_kept_aside(tmp_path, caplog):
    record = _three_records(tmp_path)
    (seg,) = segments(tmp_path)
    data = bytearray(seg.read_bytes())
    data[record + HEADER.size + 5] ^= 0x01  # the middle record: good data follows, so this is no torn write
    seg.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger=queue_mod.__name__):
        q = DiskQueue(tmp_path)
    with q:
        assert q.pending() == [(0, b"A" * 100)]
        assert q.stats().truncated_bytes == 2 * record
        assert f"{seg.name}: corrupt record at offset {record}" in caplog.text
        assert seg.stat().st_size == 3 * record  # not destroyed
        new = q.append(b"new")
        assert new >= 3  # past every number the skipped bytes may hold
        assert len(segments(tmp_path)) == 2
    with DiskQueue(tmp_path) as q:
        assert q.pending() == [(0, b"A" * 100), (new, b"new")]
        q.ack(0)  # the damaged segment's last good record: the segment goes
        assert segments(tmp_path) == [tmp_path / f"queue-{new:016d}.seg"]


def test_corruption_in_an_earlier_segment_spares_the_others(tmp_path, caplog):
    # 120-byte records, 300-byte segments: two records in each of three segments.
    with DiskQueue(tmp_path, segment_bytes=300) as q:
        for i in range(6):
            q.append(bytes([65 + i]) * 100)
        q.ack(4)
    files = segments(tmp_path)
    assert len(files) == 3
    data = bytearray(files[0].read_bytes())
    data[120 + 2] ^= 0xFF  # the magic of seq 1
    files[0].write_bytes(bytes(data))
    data = bytearray(files[1].read_bytes())
    data[0:4] = b"XXXX"  # seq 2's magic: nothing good in this segment
    files[1].write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger=queue_mod.__name__):
        q = DiskQueue(tmp_path, segment_bytes=300)
    with q:
        assert [s for s, _ in q.pending()] == [0, 5]
        assert q.get(0) == b"A" * 100 and q.get(5) == b"F" * 100
        assert q.stats().truncated_bytes == 120 + 240
        assert f"{files[0].name}: corrupt record at offset 120 (bad magic)" in caplog.text
        assert files[0].exists()  # seq 0 is still pending there
        assert not files[1].exists()  # nothing pending: gone like any fully acked segment
        assert q.append(b"G") == 6


def test_torn_ack_file_tail_is_ignored(tmp_path):
    with DiskQueue(tmp_path) as q:
        q.append_many([b"a", b"b", b"c"])
        q.ack(1)
    with open(tmp_path / "queue.acks", "ab") as f:
        f.write(b"\x02\x00\x00")  # a partial ack of seq 2
    with DiskQueue(tmp_path) as q:
        assert q.pending_seqs() == [0, 2]
        q.ack(2)
    with DiskQueue(tmp_path) as q:
        assert q.pending_seqs() == [0]


def test_record_damaged_while_open_is_dropped(tmp_path, caplog):
    with DiskQueue(tmp_path) as q:
        q.append_many([b"a" * 10, b"b" * 10])
        (seg,) = segments(tmp_path)
        data = bytearray(seg.read_bytes())
        data[HEADER.size + 3] ^= 1
        seg.write_bytes(bytes(data))
        with caplog.at_level(logging.ERROR, logger=queue_mod.__name__):
            assert q.next() == (1, b"b" * 10)
        assert "record 0" in caplog.text
        assert q.stats().dropped == 1 and q.pending_seqs() == [1]


def test_second_open_is_refused(tmp_path):
    with DiskQueue(tmp_path):
        with pytest.raises(QueueLocked):
            DiskQueue(tmp_path)
        with DiskQueue(tmp_path, name="other") as other:
            other.append(b"fine")
    with DiskQueue(tmp_path):
        pass


def test_queue_full(tmp_path):
    with DiskQueue(tmp_path, max_bytes=100) as q:
        q.append(b"x" * 60)
        with pytest.raises(QueueFull, match=r"60 bytes pending.*100"):
            q.append(b"y" * 50)
        with pytest.raises(QueueFull):
            q.append_many([b"z" * 20, b"z" * 30])
        assert q.pending_seqs() == [0]
        q.append(b"y" * 40)  # exactly 100
        q.ack(0)
        assert q.append(b"w" * 60) == 2
        with pytest.raises(QueueFull):
            q.append(b"big" * 40)
    with DiskQueue(tmp_path, max_bytes=10) as q:  # the limit counts what is already pending
        with pytest.raises(QueueFull):
            q.append(b"")


def test_next_timeout_wakeup_and_close(tmp_path):
    with DiskQueue(tmp_path, fsync=False) as q:
        t0 = time.monotonic()
        assert q.next(timeout=0.05) is None
        assert 0.04 <= time.monotonic() - t0 < 2
        threading.Timer(0.05, q.append, (b"late",)).start()
        t0 = time.monotonic()
        assert q.next(timeout=10) == (0, b"late")
        assert time.monotonic() - t0 < 5

        got = []
        waiter = threading.Thread(target=lambda: got.append(q.next(after=0, timeout=None)))
        waiter.start()
        time.sleep(0.05)
        assert waiter.is_alive()
    waiter.join(5)
    assert not waiter.is_alive() and got == [None]
    assert q.next() is None


def test_producers_and_consumer_threads(tmp_path):
    q = DiskQueue(tmp_path, segment_bytes=2048, fsync=False)
    produced: list[int] = []
    consumed: list[tuple[int, bytes]] = []

    def produce(k: int) -> None:
        for i in range(150):
            produced.append(q.append(b"%d:%d" % (k, i)))

    def consume() -> None:
        last = -1
        while (item := q.next(after=last, timeout=None)) is not None:
            consumed.append(item)
            q.ack(item[0])
            last = item[0]

    consumer = threading.Thread(target=consume)
    consumer.start()
    producers = [threading.Thread(target=produce, args=(k,)) for k in range(4)]
    for t in producers:
        t.start()
    for t in producers:
        t.join()
    deadline = time.monotonic() + 10
    while len(q) and time.monotonic() < deadline:
        time.sleep(0.01)
    q.close()
    consumer.join(5)
    assert sorted(produced) == list(range(600))
    assert [s for s, _ in consumed] == list(range(600))  # in order, each once
    assert sorted(p for _, p in consumed) == sorted(b"%d:%d" % (k, i) for k in range(4) for i in range(150))
    assert len(segments(tmp_path)) == 1


CHILD = textwrap.dedent(
    """
    import sys
    from otel_tracegen.infill.queue import DiskQueue

    def payload(k):
        size = (k * 7919) % 30000
        return (b"%d;" % k + bytes(range(256)) * (size // 256 + 1))[: max(size, 8)]

    q = DiskQueue(sys.argv[1], segment_bytes=128 << 10)
    k = int(sys.argv[2])
    last = -1
    while True:
        seq = q.append(payload(k))
        assert seq > last
        last = seq
        print("A", seq, k, flush=True)
        if k % 3 == 0:
            q.ack(seq)
            print("K", seq, flush=True)
        k += 1
    """
)


def _payload(k: int) -> bytes:
    size = (k * 7919) % 30000
    return (b"%d;" % k + bytes(range(256)) * (size // 256 + 1))[: max(size, 8)]


def test_survives_kill_9(tmp_path):
    """A real SIGKILL mid-stream: every record whose append returned (the child printed it) is there, intact."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    qdir = tmp_path / "q"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    appended: dict[int, int] = {}  # seq -> k
    acked: set[int] = set()
    k = 0
    for round_ in range(3):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(qdir), str(k)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        try:
            lines = 0
            deadline = time.monotonic() + 15
            while lines < 40 + 25 * round_ and time.monotonic() < deadline:
                if not proc.stdout.readline():
                    break
                lines += 1
            os.kill(proc.pid, signal.SIGKILL)
            out, err = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL, err.decode()
        assert lines >= 40, err.decode()
        before = max(appended, default=-1)
        text = out.decode()
        complete = text[: text.rfind("\n") + 1] if "\n" in text else ""
        for line in complete.splitlines():
            kind, *rest = line.split()
            if kind == "A":
                seq, kk = map(int, rest)
                assert seq > before  # never reused across restarts
                appended[seq] = kk
                k = max(k, kk + 1)
            else:
                acked.add(int(rest[0]))
        with DiskQueue(qdir) as q:
            pending = dict(q.pending())
        for seq, kk in appended.items():
            if seq in acked:
                assert seq not in pending  # acks reach the kernel at once, so a kill loses none
            else:
                assert pending.get(seq) == _payload(kk), seq
        for seq, payload in pending.items():  # at most the one record whose print the kill beat: intact too
            kk = int(payload.split(b";")[0])
            assert payload == _payload(kk)
            if seq not in appended:
                k = max(k, kk + 1)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("append"), st.binary(max_size=40)),
            st.tuples(st.just("append_many"), st.lists(st.binary(max_size=30), max_size=4)),
            st.tuples(st.just("ack"), st.integers(0, 1000)),
            st.tuples(st.just("ack_unknown"), st.integers(0, 5)),
            st.tuples(st.just("reopen"), st.none()),
        ),
        max_size=40,
    )
)
def test_matches_a_model(ops):
    with tempfile.TemporaryDirectory() as d:
        model: dict[int, bytes] = {}
        issued: list[int] = []
        q = DiskQueue(d, segment_bytes=96, fsync=False)
        try:
            for op, arg in ops:
                if op == "append":
                    seq = q.append(arg)
                    assert not issued or seq > issued[-1]
                    issued.append(seq)
                    model[seq] = arg
                elif op == "append_many":
                    seqs = q.append_many(arg)
                    assert seqs == sorted(seqs) and len(seqs) == len(arg)
                    assert not seqs or not issued or seqs[0] > issued[-1]
                    issued.extend(seqs)
                    model.update(zip(seqs, arg))
                elif op == "ack" and issued:
                    seq = issued[arg % len(issued)]  # pending or already acked
                    q.ack(seq)
                    model.pop(seq, None)
                elif op == "ack_unknown":
                    with pytest.raises(ValueError):
                        q.ack((issued[-1] if issued else -1) + 1 + arg)
                elif op == "reopen":
                    q.close()
                    q = DiskQueue(d, segment_bytes=96, fsync=False)
                    assert q.stats().recovered == len(model)
                assert q.pending() == sorted(model.items())
                assert q.stats().bytes == sum(map(len, model.values()))
                # Every segment but the last still holds a pending record: acked ones are deleted.
                firsts = [int(p.name[6:22]) for p in segments(Path(d))]
                for lo, hi in zip(firsts, firsts[1:]):
                    assert any(lo <= s < hi for s in model), (firsts, sorted(model))
        finally:
            q.close()
