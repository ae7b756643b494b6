"""A durable queue of opaque byte records on disk: what the infill receiver holds must survive a ``kill -9``.

The receiver keeps two of these: an inbound write-ahead log (every request is on disk before it is answered, and
its records are acked out of order as the traces in it are released) and an outbound queue (a sender thread reads
records in order, sends them on with retries, then acks them). :class:`DiskQueue` gives both *at-least-once*
delivery: a record whose :meth:`~DiskQueue.append` returned is handed out again by :meth:`~DiskQueue.pending` and
:meth:`~DiskQueue.next` after any restart until it is :meth:`~DiskQueue.ack`\\ ed. A record may come back after it
was acked (an ack is not fsynced each time), never the other way round.

On-disk format, all integers little-endian, everything under one directory, ``<name>`` the queue's name:

``<name>-<first seq, 16 digits>.seg``
    Segment files, named by the sequence number of their first record. Records are appended to the last (the
    *active*) segment; once it would grow past ``segment_bytes`` a new one is started. Each record is a 20-byte
    header ``magic b"OTQ1" | seq u64 | length u32 | crc32(payload) u32`` followed by the payload. The records of a
    segment carry consecutive sequence numbers starting at the one in its name, which recovery checks. A segment
    that is not the active one and whose records are all acked is deleted.
``<name>.acks``
    The acked sequence numbers, one u64 each, appended as they are acked: written to the kernel at once (so they
    survive the process dying) but fsynced only on close and before a segment is deleted, since a lost ack only
    means a redelivery. Compacted on open (and at run time once it is mostly stale): rewritten (temp file, fsync,
    ``os.replace``) to hold only the acks of records in segments that still exist; a torn last entry is dropped.
``<name>.next``
    The next sequence number (u64) and its crc32 (u32), rewritten atomically (when it changed) on open, on close
    and before the ack file is compacted: sequence numbers are never reused even when every segment is gone, so an
    old ack can never ack a new record. On open the next number is the highest of this file, every segment's name
    and last record + 1, and the largest ack + 1.
``<name>.lock``
    Held with ``flock`` while the queue is open, so two queues (in one process or two) never share the files.

Guarantees and recovery: :meth:`~DiskQueue.append` returns once the record is written and (with ``fsync=True``,
the default) ``os.fsync``\\ ed; the directory is fsynced when a segment is created. Opening never raises for damaged
files: a torn or corrupt record at the tail of the last segment (what a crash mid-write leaves) is truncated away;
corruption anywhere else keeps the good records before it, skips the rest of that segment (logged, with the file
and offset, and left on disk until its good records are acked) and never touches other segments; a torn tail of
the ack file is ignored. :attr:`QueueStats.truncated_bytes` counts what was dropped.

Payloads are not kept in memory: an index maps each pending sequence number to its segment, offset and length, and
payloads are read back (and their checksum checked again) when they are handed out. One lock guards everything;
:meth:`~DiskQueue.next` waits on a condition for producers. Pure standard library.
"""

from __future__ import annotations

import bisect
import logging
import os
import re
import struct
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

try:  # advisory locking where the platform has it
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

MAGIC = b"OTQ1"
HEADER = struct.Struct("<4sQII")
"""Record header: magic, sequence number, payload length, crc32 of the payload."""
ACK = struct.Struct("<Q")
NEXT = struct.Struct("<QI")
"""The ``.next`` file: the next sequence number and the crc32 of its 8 bytes."""
MAX_PAYLOAD = 0xFFFFFFFF
_BINARY = getattr(os, "O_BINARY", 0)
_READ_FDS = 8
"""Segments kept open for reading at once (least recently read closed first)."""
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class QueueFull(Exception):
    """An append would take the pending bytes past ``max_bytes``: the caller should push back (e.g. answer 503)."""


class QueueClosed(RuntimeError):
    """The queue was used after :meth:`DiskQueue.close`."""


class QueueLocked(RuntimeError):
    """Another open :class:`DiskQueue` (in this process or another) holds the same directory and name."""


@dataclass
class QueueStats:
    """A snapshot of a queue's counters (:meth:`DiskQueue.stats`)."""

    records: int
    """Pending (unacked) records."""
    bytes: int
    """Payload bytes of the pending records."""
    appended: int
    """Records appended since open."""
    acked: int
    """Pending records acked since open (acking one twice counts once)."""
    recovered: int
    """Pending records found on open."""
    truncated_bytes: int
    """Torn or corrupt bytes dropped (or skipped) on open."""
    segments: int = 0
    """Segment files on disk."""
    dropped: int = 0
    """Records that no longer read back intact after open (damaged on disk while open), given up on."""


class _Segment:
    """One segment file: its records carry the sequence numbers ``first..last`` (``last = first - 1``: none)."""

    __slots__ = ("path", "first", "last", "size", "live", "sealed")

    def __init__(self, path: str, first: int) -> None:
        self.path = path
        self.first = first
        self.last = first - 1
        self.size = 0  # bytes of intact records (the file's size, for the active segment)
        self.live = 0  # pending records
        self.sealed = False  # never appended to again (damaged, or a write to it failed)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _pread(fd: int, size: int, offset: int) -> bytes:
    """Up to ``size`` bytes at ``offset`` (fewer only at the end of the file)."""
    parts = []
    while size > 0:
        if hasattr(os, "pread"):
            chunk = os.pread(fd, size, offset)
        else:  # pragma: no cover - Windows; callers hold the queue's lock
            os.lseek(fd, offset, os.SEEK_SET)
            chunk = os.read(fd, size)
        if not chunk:
            break
        parts.append(chunk)
        size -= len(chunk)
        offset += len(chunk)
    return b"".join(parts)


def _pack_seqs(seqs: Sequence[int]) -> bytes:
    step = 1 << 16
    return b"".join(struct.pack(f"<{len(seqs[i:i + step])}Q", *seqs[i : i + step]) for i in range(0, len(seqs), step))


def _scan(path: str, first: int) -> tuple[list[tuple[int, int, int]], int, int, str | None]:
    """Read a segment's records: ``(records as (seq, payload offset, length), end of the last intact record, file
    size, what is wrong at that end or None)``. Reads one record at a time, so memory stays at one payload."""
    records: list[tuple[int, int, int]] = []
    size = os.path.getsize(path)
    offset = 0
    expected = first
    problem = None
    with open(path, "rb") as f:
        while offset < size:
            head = f.read(HEADER.size)
            if len(head) < HEADER.size:
                problem = "short header"
                break
            magic, seq, length, crc = HEADER.unpack(head)
            if magic != MAGIC:
                problem = "bad magic"
                break
            if seq != expected:
                problem = f"sequence number {seq} where {expected} was due"
                break
            if offset + HEADER.size + length > size:  # checked before reading: a garbage length reads nothing
                problem = "short payload"
                break
            payload = f.read(length)
            if len(payload) < length:
                problem = "short payload"
                break
            if zlib.crc32(payload) != crc:
                problem = "checksum mismatch"
                break
            records.append((seq, offset + HEADER.size, length))
            offset += HEADER.size + length
            expected += 1
    return records, offset, size, problem


def _is_torn_tail(path: str, offset: int, size: int, expected: int) -> bool:
    """Whether the bytes from ``offset`` to the end are one interrupted (or damaged) last record, not damage with
    records after it.

    A crash mid-append leaves a prefix of the record being written: less than a header, or this record's header
    with too few (or damaged) payload bytes after it, up to the end of the file. A power loss can also leave the
    file longer than the data that reached the disk, the rest reading as zeros. Anything else is damage in the
    middle, and truncating it would destroy records that may still be good."""
    if size - offset < HEADER.size:
        return True
    with open(path, "rb") as f:
        f.seek(offset)
        magic, seq, length, _ = HEADER.unpack(f.read(HEADER.size))
        if magic == MAGIC and seq == expected and offset + HEADER.size + length >= size:
            return True
        f.seek(offset)
        while chunk := f.read(1 << 20):
            if chunk.count(0) != len(chunk):
                return False
    return True


class DiskQueue:
    """A durable, crash-safe, thread-safe queue of byte records (see the module docstring for the format).

    ``segment_bytes``: start a new segment file once the active one would pass this size (fully acked segments
    are deleted whole, so this bounds how long acked data lingers on disk). ``fsync``: fsync each append (and the
    directory, the ack file on close); without it a power loss (not a process crash) can lose recent appends.
    ``max_bytes``: bound on the pending payload bytes, beyond which :meth:`append` raises :class:`QueueFull`.
    ``name``: the files' prefix, so that several queues can share a directory.
    """

    _ACK_COMPACT_MIN = 1 << 16
    """Ack-file entries before a runtime compaction is considered (class attribute so tests can lower it)."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        segment_bytes: int = 16 << 20,
        fsync: bool = True,
        max_bytes: int | None = None,
        name: str = "queue",
    ) -> None:
        if segment_bytes <= 0:
            raise ValueError(f"segment_bytes must be positive, not {segment_bytes}")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be at least 0, not {max_bytes}")
        if not _NAME.fullmatch(name):
            raise ValueError(f"queue name {name!r}: use letters, digits, '_', '.' and '-'")
        self._dir = os.fspath(directory)
        self._name = name
        self._segment_bytes = segment_bytes
        self._fsync = fsync
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._closed = False
        self._segments: dict[int, _Segment] = {}  # by first sequence number, in order
        self._active: _Segment | None = None
        self._wfd: int | None = None  # the active segment, opened for appending
        self._rfds: OrderedDict[int, int] = OrderedDict()  # segment first seq -> fd open for reading
        self._ack_fd: int | None = None
        self._ack_size = 0
        self._ack_entries = 0
        self._ack_broken = False  # a failed ack write may have left a partial entry: rewrite before appending
        self._compact_at = self._ACK_COMPACT_MIN
        self._index: dict[int, tuple[_Segment, int, int]] = {}  # pending seq -> (segment, payload offset, length)
        self._order: list[int] = []  # pending seqs ascending, with acked ones removed lazily (see _trim_order)
        self._head = 0  # _order[:_head] are all acked
        self._bytes = 0
        self._next_seq = 0
        self._stored_next = -1
        self._appended = 0
        self._acked = 0
        self._dropped = 0
        self._truncated = 0
        os.makedirs(self._dir, exist_ok=True)
        self._lock_fd = self._take_lock()
        try:
            self._recover()
        except BaseException:
            self._close_fds()
            raise
        self._recovered = len(self._index)

    # -- public API ---------------------------------------------------------------------------------------------

    @property
    def directory(self) -> str:
        return self._dir

    @property
    def name(self) -> str:
        return self._name

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        """Pending records."""
        with self._lock:
            return len(self._index)

    def __repr__(self) -> str:
        return f"DiskQueue({self._dir!r}, name={self._name!r}, pending={len(self._index)}, next_seq={self._next_seq})"

    def append(self, payload: bytes) -> int:
        """Store ``payload`` durably and return its sequence number (monotonic, never reused, even across
        restarts). Returns only once the record is written and, with ``fsync``, on stable storage."""
        return self.append_many([payload])[0]

    def append_many(self, payloads: Sequence[bytes]) -> list[int]:
        """Store several records with one write and one fsync (all in one segment); their sequence numbers, in
        order. Either all are accepted or, on :class:`QueueFull` or an I/O error, none are handed out."""
        items = [p if type(p) is bytes else memoryview(p).tobytes() for p in payloads]
        if not items:
            return []
        for p in items:
            if len(p) > MAX_PAYLOAD:
                raise ValueError(f"{self._name}: a record holds at most {MAX_PAYLOAD} bytes, not {len(p)}")
        crcs = [zlib.crc32(p) for p in items]  # outside the lock: the CPU-heavy part
        total = sum(map(len, items))
        n = len(items)
        with self._cond:
            self._check_open()
            if self._max_bytes is not None and self._bytes + total > self._max_bytes:
                raise QueueFull(
                    f"{self._name}: queue full: {self._bytes} bytes pending + {total} new > max_bytes {self._max_bytes}"
                )
            first = self._next_seq
            parts = []
            for i, (p, crc) in enumerate(zip(items, crcs)):
                parts.append(HEADER.pack(MAGIC, first + i, len(p), crc))
                parts.append(p)
            data = b"".join(parts)
            seg = self._active_for(first, len(data))
            offset = seg.size
            self._write_durably(seg, data, n)
            for i, p in enumerate(items):
                self._index[first + i] = (seg, offset + HEADER.size, len(p))
                offset += HEADER.size + len(p)
            self._order.extend(range(first, first + n))
            seg.size = offset
            seg.last = first + n - 1
            seg.live += n
            self._next_seq = first + n
            self._bytes += total
            self._appended += n
            self._cond.notify_all()
            return list(range(first, first + n))

    def ack(self, seq: int) -> None:
        """Done with record ``seq``: it is not handed out again. Acking twice is harmless; a sequence number this
        queue never issued raises :class:`ValueError`."""
        self.ack_many((seq,))

    def ack_many(self, seqs: Iterable[int]) -> None:
        """:meth:`ack` several records with one write to the ack file. Checks them all before acking any."""
        seqs = [int(s) for s in seqs]
        with self._cond:
            self._check_open()
            for s in seqs:
                if s < 0 or s >= self._next_seq:
                    raise ValueError(f"{self._name}: unknown sequence number {s} (next is {self._next_seq})")
            todo = list(dict.fromkeys(s for s in seqs if s in self._index))
            if not todo:
                return
            self._append_acks(todo)
            emptied = []
            for s in todo:
                seg = self._forget(s)
                if seg.live == 0:
                    emptied.append(seg)
            self._acked += len(todo)
            for seg in emptied:
                self._maybe_delete(seg)
            self._trim_order()
            self._maybe_compact_acks()

    def pending(self) -> list[tuple[int, bytes]]:
        """Every unacked record, ``(seq, payload)`` in sequence order, read from disk now."""
        with self._cond:
            self._check_open()
            out = []
            for seq in list(self._index):
                payload = self._read(seq)
                if payload is not None:
                    out.append((seq, payload))
            return out

    def pending_seqs(self) -> list[int]:
        """The unacked sequence numbers in order, without reading payloads."""
        with self._cond:
            self._check_open()
            return list(self._index)

    def get(self, seq: int) -> bytes | None:
        """The payload of pending record ``seq``; None when it is not pending (acked, or never issued)."""
        with self._cond:
            self._check_open()
            return self._read(seq) if seq in self._index else None

    def next(self, after: int = -1, timeout: float | None = 0.0) -> tuple[int, bytes] | None:
        """The first unacked record with a sequence number above ``after``, waiting up to ``timeout`` seconds
        (``None``: for ever) for one to be appended. None on timeout, or once the queue is closed (which wakes
        waiters), so a consumer thread can loop on it and stop cleanly."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._closed:
                    return None
                seq = self._first_after(after)
                if seq is not None:
                    payload = self._read(seq)
                    if payload is None:  # damaged on disk and dropped: look again
                        continue
                    return seq, payload
                if deadline is None:
                    self._cond.wait()
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                    self._cond.wait(remaining)

    def stats(self) -> QueueStats:
        """A snapshot of the counters (usable after close)."""
        with self._lock:
            return QueueStats(
                records=len(self._index),
                bytes=self._bytes,
                appended=self._appended,
                acked=self._acked,
                recovered=self._recovered,
                truncated_bytes=self._truncated,
                segments=len(self._segments),
                dropped=self._dropped,
            )

    def close(self) -> None:
        """Make the acks durable, record the next sequence number, close the files and wake every :meth:`next`
        waiter (they return None). Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            try:
                if self._fsync and self._ack_fd is not None:
                    os.fsync(self._ack_fd)
                self._write_next()
            finally:
                self._close_fds()
                self._cond.notify_all()

    def __enter__(self) -> DiskQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- opening ------------------------------------------------------------------------------------------------

    def _path(self, suffix: str) -> str:
        return os.path.join(self._dir, self._name + suffix)

    def _take_lock(self) -> int | None:
        """Lock ``<name>.lock`` so that a second queue on the same files fails loudly instead of corrupting them.
        The kernel drops the lock when the process dies, so a crash never leaves it stale."""
        if fcntl is None:  # pragma: no cover
            return None
        path = self._path(".lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _BINARY, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise QueueLocked(f"{path}: queue {self._name!r} is already open (in this or another process)") from None
        except OSError as e:  # a file system without flock: go on unprotected
            log.warning("%s: cannot lock (%s); make sure only one process opens this queue", path, e)
        return fd

    def _recover(self) -> None:
        """Rebuild the index from the files, repair what a crash left, and open the active segment."""
        for suffix in (".acks.tmp", ".next.tmp"):  # a rewrite interrupted before its os.replace
            try:
                os.unlink(self._path(suffix))
            except FileNotFoundError:
                pass
        high = self._read_next()
        acked, ack_entries, ack_torn = self._read_acks()
        if acked:
            high = max(high, max(acked) + 1)
        pattern = re.compile(re.escape(self._name) + r"-(\d{16})\.seg")
        files = sorted(
            (int(m.group(1)), os.path.join(self._dir, entry))
            for entry in os.listdir(self._dir)
            if (m := pattern.fullmatch(entry))
        )
        reached = -1
        segments: list[_Segment] = []
        for i, (first, path) in enumerate(files):
            if first <= reached:
                log.warning(
                    "%s: starts at sequence number %d, which an earlier segment already reached; ignoring it",
                    path,
                    first,
                )
                continue
            records, end, size, problem = _scan(path, first)
            seg = _Segment(path, first)
            seg.size = end
            if records:
                seg.last = records[-1][0]
            high = max(high, first, seg.last + 1)
            if problem is not None:
                lost = size - end
                self._truncated += lost
                if i == len(files) - 1 and _is_torn_tail(path, end, size, seg.last + 1):
                    log.warning(
                        "%s: dropping a torn record at offset %d (%s, %d bytes): an append was interrupted",
                        path,
                        end,
                        problem,
                        lost,
                    )
                    self._truncate(path, end)
                else:
                    log.warning(
                        "%s: corrupt record at offset %d (%s): keeping the %d records before it, skipping %d bytes",
                        path,
                        end,
                        problem,
                        len(records),
                        lost,
                    )
                    seg.sealed = True
                    if i == len(files) - 1:
                        # No later segment's name bounds the numbers the skipped bytes may hold, but every record
                        # takes at least a header: jumping past this many means none of theirs is issued again.
                        high = max(high, seg.last + 2 + lost // HEADER.size)
            for seq, offset, length in records:
                if seq not in acked:
                    self._index[seq] = (seg, offset, length)
                    seg.live += 1
                    self._bytes += length
            reached = max(reached, seg.last)
            segments.append(seg)
        self._next_seq = high
        self._order = list(self._index)
        self._segments = {seg.first: seg for seg in segments}
        if segments and not segments[-1].sealed:
            self._active = segments[-1]
        self._write_next()  # before any ack is dropped below
        deleted = False
        for seg in segments:
            if seg.live == 0 and seg is not self._active:
                deleted |= self._delete(seg)
        if deleted:
            self._fsync_dir()
        needed = self._needed_acks()
        if ack_torn or len(needed) != ack_entries:
            self._rewrite_acks(needed)
            ack_entries = len(needed)
        self._open_acks(ack_entries)
        if self._active is not None:
            self._wfd = os.open(self._active.path, os.O_WRONLY | os.O_APPEND | _BINARY)

    def _read_next(self) -> int:
        try:
            with open(self._path(".next"), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return 0
        if len(data) == NEXT.size:
            value, crc = NEXT.unpack(data)
            if zlib.crc32(data[:8]) == crc:
                self._stored_next = value
                return value
        log.warning("%s: damaged, ignored; sequence numbers continue from the segments and acks", self._path(".next"))
        return 0

    def _read_acks(self) -> tuple[set[int], int, bool]:
        """The acked sequence numbers, how many entries the file holds, and whether it ends in a partial one."""
        try:
            with open(self._path(".acks"), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return set(), 0, False
        n = len(data) // ACK.size
        torn = len(data) % ACK.size != 0
        if torn:
            log.info("%s: ignoring a torn last entry (%d bytes)", self._path(".acks"), len(data) % ACK.size)
        return set(struct.unpack_from(f"<{n}Q", data)), n, torn

    def _truncate(self, path: str, size: int) -> None:
        fd = os.open(path, os.O_WRONLY | _BINARY)
        try:
            os.ftruncate(fd, size)
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    # -- writing ------------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise QueueClosed(f"queue {self._name!r} in {self._dir} is closed")

    def _active_for(self, first: int, size: int) -> _Segment:
        """The segment to append ``size`` bytes of records starting at ``first`` to, rotating when needed."""
        seg = self._active
        if seg is not None and not seg.sealed:
            if seg.size == 0 and seg.first == first:
                return seg
            if seg.size > 0 and seg.last + 1 == first and seg.size + size <= self._segment_bytes:
                return seg
        old = seg
        if self._wfd is not None:
            os.close(self._wfd)
            self._wfd = None
        self._active = None
        path = os.path.join(self._dir, f"{self._name}-{first:016d}.seg")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | _BINARY, 0o644)
        try:
            self._fsync_dir()  # the new file's name is durable before anything in it is promised
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        new = _Segment(path, first)
        self._segments[first] = new
        self._active = new
        self._wfd = fd
        if old is not None:
            self._maybe_delete(old)  # fully acked (or empty) and no longer active
        return new

    def _write_durably(self, seg: _Segment, data: bytes, n: int) -> None:
        """Append ``data`` (``n`` records) to the active segment and fsync it, or leave no record behind: a failed
        write is cut off again; if even that fails, or the fsync fails (after which the file's state is unknown),
        the segment is sealed and the records' sequence numbers are skipped, so nothing half-written is ever
        mistaken for a later record."""
        assert self._wfd is not None
        try:
            _write_all(self._wfd, data)
        except BaseException:
            try:
                os.ftruncate(self._wfd, seg.size)
            except OSError:
                self._abandon(seg, n)
            raise
        if self._fsync:
            try:
                os.fsync(self._wfd)
            except BaseException:
                self._abandon(seg, n)
                raise

    def _abandon(self, seg: _Segment, n: int) -> None:
        log.error("%s: a write failed and could not be undone; continuing in a new segment", seg.path)
        seg.sealed = True
        self._next_seq += n
        if self._wfd is not None:
            os.close(self._wfd)
            self._wfd = None
        self._active = None

    def _append_acks(self, seqs: list[int]) -> None:
        assert self._ack_fd is not None
        if self._ack_broken:
            self._compact_acks()
        try:
            _write_all(self._ack_fd, _pack_seqs(seqs))
        except BaseException:
            try:
                os.ftruncate(self._ack_fd, self._ack_size)
            except OSError:
                self._ack_broken = True  # a partial entry would shift every later one: rewrite before the next
            raise
        self._ack_size += len(seqs) * ACK.size
        self._ack_entries += len(seqs)

    def _open_acks(self, entries: int) -> None:
        self._ack_fd = os.open(self._path(".acks"), os.O_WRONLY | os.O_CREAT | os.O_APPEND | _BINARY, 0o644)
        self._ack_size = os.fstat(self._ack_fd).st_size
        self._ack_entries = entries
        self._ack_broken = False

    def _needed_acks(self) -> list[int]:
        """The acks that still matter: those of records in segments that exist (a segment's records are
        ``first..last``, so the acked ones are those not pending)."""
        index = self._index
        return [s for seg in self._segments.values() for s in range(seg.first, seg.last + 1) if s not in index]

    def _maybe_compact_acks(self) -> None:
        """Rewrite the ack file once most of it is acks of deleted segments, so that it does not grow for ever."""
        if self._ack_entries < self._compact_at:
            return
        needed = sum(seg.last - seg.first + 1 - seg.live for seg in self._segments.values())
        if self._ack_entries > 2 * needed:
            self._compact_acks()
        self._compact_at = max(self._ACK_COMPACT_MIN, 2 * self._ack_entries)

    def _compact_acks(self) -> None:
        self._write_next()  # the dropped acks no longer bound the sequence numbers: the .next file must
        needed = self._needed_acks()
        if self._ack_fd is not None:
            os.close(self._ack_fd)
            self._ack_fd = None
        self._rewrite_acks(needed)
        self._open_acks(len(needed))

    def _rewrite_acks(self, seqs: list[int]) -> None:
        self._replace(".acks", _pack_seqs(seqs))

    def _write_next(self) -> None:
        if self._next_seq == self._stored_next:
            return
        raw = ACK.pack(self._next_seq)
        self._replace(".next", raw + struct.pack("<I", zlib.crc32(raw)))
        self._stored_next = self._next_seq

    def _replace(self, suffix: str, data: bytes) -> None:
        """Replace a file atomically: a crash leaves the old one or the new one, never a mix."""
        path = self._path(suffix)
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _BINARY, 0o644)
        try:
            _write_all(fd, data)
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        self._fsync_dir()

    def _fsync_dir(self) -> None:
        if not self._fsync or os.name == "nt":
            return
        fd = os.open(self._dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError as e:  # some file systems cannot fsync a directory
            log.debug("%s: cannot fsync the directory: %s", self._dir, e)
        finally:
            os.close(fd)

    # -- acking and deleting ------------------------------------------------------------------------------------

    def _forget(self, seq: int) -> _Segment:
        seg, _, length = self._index.pop(seq)
        seg.live -= 1
        self._bytes -= length
        return seg

    def _maybe_delete(self, seg: _Segment) -> None:
        if seg.live == 0 and seg is not self._active and seg.first in self._segments:
            if self._fsync and self._ack_fd is not None:
                os.fsync(self._ack_fd)  # the acks that say this segment is done are durable before it goes
            self._delete(seg)

    def _delete(self, seg: _Segment) -> bool:
        fd = self._rfds.pop(seg.first, None)
        if fd is not None:
            os.close(fd)
        try:
            os.unlink(seg.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("%s: cannot delete a fully acked segment: %s", seg.path, e)
            return False
        del self._segments[seg.first]
        return True

    def _trim_order(self) -> None:
        """Drop acked seqs from the front of ``_order`` (the usual in-order case) and rebuild it when acked ones
        elsewhere make up most of it (out-of-order acks), keeping :meth:`next` cheap either way."""
        order, index, head = self._order, self._index, self._head
        while head < len(order) and order[head] not in index:
            head += 1
        if head > 1024 and 2 * head > len(order):
            del order[:head]
            head = 0
        elif len(order) - head - len(index) > max(1024, len(index)):
            order[:] = [s for s in order[head:] if s in index]
            head = 0
        self._head = head

    # -- reading ------------------------------------------------------------------------------------------------

    def _first_after(self, after: int) -> int | None:
        order, index = self._order, self._index
        i = bisect.bisect_right(order, after, lo=self._head)
        while i < len(order):
            if order[i] in index:
                return order[i]
            i += 1
        return None

    def _read_fd(self, seg: _Segment) -> int:
        fd = self._rfds.get(seg.first)
        if fd is not None:
            self._rfds.move_to_end(seg.first)
            return fd
        fd = os.open(seg.path, os.O_RDONLY | _BINARY)
        self._rfds[seg.first] = fd
        while len(self._rfds) > _READ_FDS:
            os.close(self._rfds.popitem(last=False)[1])
        return fd

    def _read(self, seq: int) -> bytes | None:
        """Record ``seq``'s payload, checked again against its header; a record damaged since open is logged and
        dropped (None) rather than handed out wrong or left to block the consumer for ever."""
        seg, offset, length = self._index[seq]
        data = _pread(self._read_fd(seg), HEADER.size + length, offset - HEADER.size)
        problem = None
        if len(data) < HEADER.size + length:
            problem = "the file is shorter"
        else:
            magic, s, n, crc = HEADER.unpack_from(data)
            if (magic, s, n) != (MAGIC, seq, length):
                problem = "the header changed"
            elif zlib.crc32(memoryview(data)[HEADER.size :]) != crc:
                problem = "checksum mismatch"
        if problem is None:
            return data[HEADER.size :]
        log.error("%s: record %d at offset %d no longer reads back (%s); dropping it", seg.path, seq, offset, problem)
        self._forget(seq)
        self._dropped += 1
        self._maybe_delete(seg)
        self._trim_order()
        return None

    def _close_fds(self) -> None:
        for fd in [self._wfd, self._ack_fd, *self._rfds.values()]:
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._wfd = self._ack_fd = None
        self._rfds.clear()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
