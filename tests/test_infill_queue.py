"""The infill receiver's durable queue (SQLite): round trips, restarts, locking, a real kill -9, threads."""

from __future__ import annotations

import os
import signal
import sqlite3
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
from otel_tracegen.infill.queue import DiskQueue, QueueClosed, QueueFull, QueueLocked

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def test_round_trip_and_acks(tmp_path):
    with DiskQueue(tmp_path) as q:
        seqs = [q.append(p) for p in (b"a", b"bb", b"")]
        assert seqs == [0, 1, 2]
        assert q.append_many([b"c", bytearray(b"d"), memoryview(b"e")]) == [3, 4, 5]
        assert q.append_many([]) == []
        assert list(q.pending()) == [(0, b"a"), (1, b"bb"), (2, b""), (3, b"c"), (4, b"d"), (5, b"e")]
        assert q.next() == (0, b"a")
        assert q.next(after=0) == (1, b"bb")
        assert q.next(after=5) is None
        q.ack(1)
        q.ack(1)  # idempotent
        q.ack_many([0, 3, 3])
        q.ack_many([])
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
        assert (s.records, s.bytes, s.appended, s.acked, s.recovered) == (3, 2, 6, 3, 0)
        with pytest.raises(TypeError):
            q.append("text")  # type: ignore[arg-type]
        assert "pending=3" in repr(q) and q.name == "queue" and q.directory == str(tmp_path)
    assert q.closed
    for use in (lambda: q.append(b"x"), lambda: q.ack(2), q.pending, q.pending_seqs, lambda: q.get(2)):
        with pytest.raises(QueueClosed):
            use()
    assert q.next() is None
    assert q.stats().records == 3  # usable after close
    q.close()  # idempotent


def test_large_records_round_trip_as_blobs_and_survive_a_restart(tmp_path):
    """Records from 64 KiB on are written and read with SQLite's blob I/O (no copy bound as a parameter): the
    same bytes come back through every way of reading, on both sides of the boundary and after a restart."""
    edge = queue_mod._BLOB_BYTES
    payloads = [os.urandom(n) for n in (edge - 1, edge, edge + 1, 3 << 20, 10)]
    with DiskQueue(tmp_path) as q:
        seqs = q.append_many(payloads)
        assert [q.get(s) for s in seqs] == payloads
        assert [q.next(after=s - 1)[1] for s in seqs] == payloads
        assert q.stats().bytes == sum(map(len, payloads))
        q.ack(seqs[1])
    with DiskQueue(tmp_path) as q:
        kept = [p for i, p in enumerate(payloads) if i != 1]
        assert [p for _, p in q.pending()] == kept
        assert [q.get(s) for s in q.pending_seqs()] == kept
    assert queue_mod.write_copies(edge - 1) == 2 * (edge - 1)
    assert queue_mod.write_copies(edge) == (0 if queue_mod._BLOB_IO else 2 * edge)


def _statements(q: DiskQueue) -> list[str]:
    seen: list[str] = []
    q._db.set_trace_callback(seen.append)
    return seen


def _commits(statements: list[str]) -> list[str]:
    """The synchronous level in effect at each COMMIT."""
    level, out = None, []
    for s in statements:
        if s.startswith("PRAGMA synchronous="):
            level = s.split("=")[1]
        elif s == "COMMIT":
            out.append(level)
    return out


def test_one_durable_commit_per_append_and_lazy_acks(tmp_path):
    with DiskQueue(tmp_path) as q:
        seen = _statements(q)
        q.append(b"x")
        q.append_many([b"p%d" % i for i in range(50)])
        q.ack_many(range(10))
        q.ack(20)
        q.append(b"y")
        assert _commits(seen) == ["FULL", "FULL", "NORMAL", "NORMAL", "FULL"]  # the first PRAGMA sets FULL
    with DiskQueue(tmp_path, fsync=False) as q:
        seen = _statements(q)
        q.append_many([b"y", b"z"])
        q.ack(0)
        assert len(_commits(seen)) == 2 and not any("FULL" in s for s in seen)


def test_restart_keeps_unacked_and_continues_seqs(tmp_path):
    with DiskQueue(tmp_path) as q:
        for i in range(6):
            q.append(b"r%d" % i)
        q.ack_many([1, 3, 4])
    with DiskQueue(tmp_path) as q:
        assert list(q.pending()) == [(0, b"r0"), (2, b"r2"), (5, b"r5")]
        assert q.stats().recovered == 3 and q.stats().bytes == 6
        assert q.append(b"r6") == 6
        q.ack(0)
        q.ack(0)
    with DiskQueue(tmp_path) as q:
        assert q.pending_seqs() == [2, 5, 6]
        assert q.stats().bytes == 6


def test_seqs_never_reused_once_everything_is_acked(tmp_path):
    with DiskQueue(tmp_path) as q:
        q.append_many([b"a", b"b", b"c"])
        q.ack_many([0, 1, 2])
    with DiskQueue(tmp_path) as q:
        assert list(q.pending()) == [] and len(q) == 0
        assert q.append(b"d") == 3
        q.ack(3)
        with pytest.raises(ValueError):
            q.ack(4)
    with DiskQueue(tmp_path) as q:
        assert q.append(b"e") == 4


def test_several_queues_share_a_directory_by_name(tmp_path):
    with DiskQueue(tmp_path, name="inbound") as a, DiskQueue(tmp_path, fsync=False, name="outbound") as b:
        a.append(b"in")
        b.append_many([b"out1", b"out2"])
    with DiskQueue(tmp_path, name="inbound") as a, DiskQueue(tmp_path, name="outbound") as b:
        assert list(a.pending()) == [(0, b"in")] and list(b.pending()) == [(0, b"out1"), (1, b"out2")]
    for bad in ("", "a/b", "x y"):
        with pytest.raises(ValueError, match="queue name"):
            DiskQueue(tmp_path, name=bad)


def test_second_open_is_refused(tmp_path):
    with DiskQueue(tmp_path):
        with pytest.raises(QueueLocked):
            DiskQueue(tmp_path)
        with DiskQueue(tmp_path, name="other") as other:
            other.append(b"fine")
    with DiskQueue(tmp_path):
        pass


OPEN_CHILD = textwrap.dedent(
    """
    import sys
    from otel_tracegen.infill.queue import DiskQueue, QueueLocked

    try:
        q = DiskQueue(sys.argv[1])
    except QueueLocked as e:
        print("locked", e)
    else:
        print("opened", q.append(b"child"))
        q.close()
    """
)


def test_second_open_from_another_process_is_refused(tmp_path):
    def child() -> str:
        return subprocess.run([sys.executable, "-c", OPEN_CHILD, str(tmp_path)], capture_output=True, text=True,
                              env=ENV, timeout=60, check=True).stdout  # fmt: skip

    with DiskQueue(tmp_path) as q:
        q.append(b"parent")
        out = child()
        assert out.startswith("locked") and "already open" in out
    assert child().split() == ["opened", "1"]  # the lock goes with the queue
    with DiskQueue(tmp_path) as q:
        assert list(q.pending()) == [(0, b"parent"), (1, b"child")]


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
        assert q.stats().bytes == 100
        with pytest.raises(QueueFull):
            q.append(b"")
    with pytest.raises(ValueError):
        DiskQueue(tmp_path, max_bytes=-1)


def test_payload_over_the_limit(tmp_path, monkeypatch):
    with DiskQueue(tmp_path) as q:
        monkeypatch.setattr(q, "_max_payload", 10)
        with pytest.raises(ValueError, match="at most 10 bytes"):
            q.append_many([b"ok", b"x" * 11])
        assert q.append(b"x" * 10) == 0


class FailingCommit:
    """A connection whose COMMIT fails (a full disk, a failed fsync), otherwise the real one."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def execute(self, sql, *args):
        if sql == "COMMIT":
            raise sqlite3.OperationalError("disk I/O error")
        return self.db.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.db, name)


def test_a_failed_commit_stores_nothing_and_spends_its_numbers(tmp_path):
    with DiskQueue(tmp_path) as q:
        q.append(b"a")
        real = q._db
        q._db = FailingCommit(real)
        with pytest.raises(sqlite3.OperationalError):
            q.append_many([b"b", b"c"])
        with pytest.raises(sqlite3.OperationalError):
            q.ack(0)
        q._db = real
        assert not real.in_transaction
        assert q.pending_seqs() == [0] and len(q) == 1 and q.stats().bytes == 1
        assert q.append(b"d") == 3
    with DiskQueue(tmp_path) as q:
        assert list(q.pending()) == [(0, b"a"), (3, b"d")]


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


def test_next_waits_past_records_acked_meanwhile(tmp_path):
    with DiskQueue(tmp_path, fsync=False) as q:
        q.append_many([b"a", b"b"])
        q.ack(1)  # above after=0 there is nothing pending, though seq 1 was issued
        t0 = time.monotonic()
        assert q.next(after=0, timeout=0.05) is None
        assert time.monotonic() - t0 >= 0.04
        threading.Timer(0.05, q.append, (b"c",)).start()
        assert q.next(after=0, timeout=10) == (2, b"c")


def test_pending_reads_in_chunks_and_lets_the_loop_ack(tmp_path, monkeypatch):
    monkeypatch.setattr(queue_mod, "_READ_BYTES", 25)
    with DiskQueue(tmp_path) as q:
        q.append_many([b"%02d" % i * 5 for i in range(10)])  # 10 bytes each: 3 per trip
        seen = []
        it = q.pending()
        q.append(b"late")  # after the call: not included
        for seq, payload in it:
            seen.append(seq)
            q.ack(seq)  # the queue is not locked between records
            if seq == 4:
                q.ack(7)  # acked before its trip to the database: skipped
        assert seen == [0, 1, 2, 3, 4, 5, 6, 8, 9]
        assert list(q.pending()) == [(10, b"late")]
        it = q.pending()
        next(it)
        q.close()
        with pytest.raises(QueueClosed):
            next(it)


def test_space_is_given_back_once_acked(tmp_path, monkeypatch):
    monkeypatch.setattr(queue_mod, "_VACUUM_PAGES", 16)
    db = tmp_path / "queue.sqlite3"
    with DiskQueue(tmp_path, fsync=False) as q:
        seqs = q.append_many([os.urandom(50_000) for _ in range(20)])
        q._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        full = db.stat().st_size
        assert full > 1_000_000
        q.ack_many(seqs[:-1])
        q._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert db.stat().st_size == full  # a record is still pending: the free pages wait for new records
        q.ack(seqs[-1])
        q._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert db.stat().st_size < full / 5
        assert q.append(b"next") == seqs[-1] + 1  # VACUUM keeps the highest number issued


def test_producers_and_consumer_threads(tmp_path):
    q = DiskQueue(tmp_path, fsync=False)
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


def test_segment_bytes_is_deprecated_and_old_segments_are_refused(tmp_path):
    with pytest.warns(DeprecationWarning, match="segment_bytes"):
        DiskQueue(tmp_path, segment_bytes=1 << 20).close()
    (tmp_path / "queue-0000000000000000.seg").write_bytes(b"OTQ1")
    with pytest.raises(RuntimeError, match="former queue format"):
        DiskQueue(tmp_path)
    with DiskQueue(tmp_path, name="other"):  # another name's files are not this queue's
        pass


def test_a_damaged_database_is_refused_not_dropped(tmp_path):
    (tmp_path / "queue.sqlite3").write_bytes(b"not a database" * 400)
    with pytest.raises(sqlite3.DatabaseError):
        DiskQueue(tmp_path)
    (tmp_path / "queue.sqlite3").unlink()
    with DiskQueue(tmp_path) as q:  # the failed open released the lock
        assert q.append(b"x") == 0


CHILD = textwrap.dedent(
    """
    import sys
    from otel_tracegen.infill.queue import DiskQueue

    def payload(k):
        size = (k * 7919) % 30000
        return (b"%d;" % k + bytes(range(256)) * (size // 256 + 1))[: max(size, 8)]

    q = DiskQueue(sys.argv[1])
    k = int(sys.argv[2])
    last = -1
    while True:
        seqs = q.append_many([payload(k + i) for i in range(1 + k % 3)])
        assert seqs[0] > last
        last = seqs[-1]
        for i, seq in enumerate(seqs):
            print("A", seq, k + i, flush=True)
            if (k + i) % 3 == 0:
                q.ack(seq)
                print("K", seq, flush=True)
        k += len(seqs)
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
    appended: dict[int, int] = {}  # seq -> k
    acked: set[int] = set()
    k = 0
    for round_ in range(3):
        proc = subprocess.Popen([sys.executable, str(script), str(qdir), str(k)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=ENV)  # fmt: skip
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
            assert q.stats().recovered == len(pending)
        for seq, kk in appended.items():
            if seq in acked:
                assert seq not in pending  # acks reach the kernel at once, so a kill loses none
            else:
                assert pending.get(seq) == _payload(kk), seq
        for seq, payload in pending.items():  # at most the batch whose print the kill beat: intact too
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
        q = DiskQueue(d, fsync=False)
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
                    q = DiskQueue(d, fsync=False)
                    assert q.stats().recovered == len(model)
                assert list(q.pending()) == sorted(model.items())
                assert len(q) == len(model) and q.stats().bytes == sum(map(len, model.values()))
                first = min(model, default=None)
                assert q.next() == (None if first is None else (first, model[first]))
        finally:
            q.close()
