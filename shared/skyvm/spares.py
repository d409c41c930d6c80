"""Ready children for a cluster's agent: forked while the cluster is idle, each waits for one node.

Why: most of a warm node's CPU is not its code but the fork itself. Forking copies the parent's page
tables (a parent that imported Prefect maps a few hundred megabytes). Then each page the node writes
first (a reference count, a free block in an allocator pool) is copied from the parent's (copy on
write). Measured, a trivial Prefect task's node spent a third of its CPU in page faults and a tenth in
the fork. A spare does both before its node exists, while the cluster has nothing to run: it is forked
then, and it faults in the pages that nodes write (learnt from one, ``written_pages``) with
``MADV_POPULATE_WRITE``, which copies a page as a write would without writing anything. A node handed
to a spare starts with that done. Nothing about the interpreter differs: a spare has run no code of a
node's and changed no byte of the parent's state; it is a fresh child, only earlier.

Parent side (the agent): ``job_blob``, ``hand_over``, ``close``. Child side: ``wait_for_job``, ``record_written_pages``.
May import: the standard library (the agent's parent imports it: nothing that a node would not).
"""

from __future__ import annotations

import ctypes
import os
import pickle
import struct
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# How many spares an agent keeps ready at most; 0 turns them off. Each holds the pages it faulted in (about
# 15 MB for a Prefect task's node), and they are made only while the cluster is idle.
COUNT_ENV = "SKYVM_AGENT_SPARES"
DEFAULT_COUNT = 6
# Spares together hold at most this share of the cluster's memory limit: the rest is the nodes'.
MEMORY_SHARE = 0.1
# What a spare holds beyond the pages it faults in: its page tables and the pages the fork itself writes.
FORK_BYTES = 4 << 20
# Idle means no node for this long: spares are not made between the nodes of a burst, which need the CPU.
IDLE_S = 0.5
# A job larger than this goes to a child forked for it: the pipe a spare reads its job from holds 64 KiB,
# and the agent's loop must never block on a write.
JOB_MAX = 60_000
# At most this many pages are learnt (64 MiB): a spare faults in no more than that.
PAGES_MAX = 16384

_PAGE = os.sysconf("SC_PAGE_SIZE")
_PRESENT, _EXCLUSIVE = 1 << 63, 1 << 56  # /proc/PID/pagemap's flags (Documentation/admin-guide/mm/pagemap.rst)
_MADV_POPULATE_WRITE = 23  # Linux 5.14 and later; an older kernel answers EINVAL and spares fault nothing in
_HEADER = struct.Struct("!Q")
_MAPPING_MAX = 1 << 30
_NOT_HEAP = ("[stack]", "[vvar]", "[vvar_vclock]", "[vdso]", "[vsyscall]")


def count() -> int:
    try:
        return max(0, int(os.environ.get(COUNT_ENV, DEFAULT_COUNT)))
    except ValueError:
        return DEFAULT_COUNT


def wanted(pages_file: Path, memory_limit: Optional[int]) -> int:
    """How many spares to keep: ``count()``, fewer where they would hold more than ``MEMORY_SHARE`` of the
    cluster's memory (each holds the pages learnt so far)."""
    most = count()
    if not memory_limit or most == 0:
        return most
    try:
        runs = array("Q", pages_file.read_bytes())
    except OSError:
        runs = array("Q")
    each = FORK_BYTES + sum(runs[1::2])
    return min(most, int(memory_limit * MEMORY_SHARE) // each)


@dataclass
class Spare:
    pid: int
    job: int  # the write end of the pipe its job comes on
    pipe: int  # the read end of its stdout and stderr
    pidfd: Optional[int] = None

    def fds(self) -> list[int]:
        return [fd for fd in (self.job, self.pipe, self.pidfd) if fd is not None and fd >= 0]


def job_blob(req: dict, learn: bool) -> Optional[bytes]:
    """What ``hand_over`` writes to a spare's pipe; None for a job too large for it (the agent forks a child
    for that one instead)."""
    blob = pickle.dumps((req, learn))
    return _HEADER.pack(len(blob)) + blob if len(blob) <= JOB_MAX else None


def hand_over(spare: Spare, blob: bytes) -> bool:
    """Give ``spare`` its job; False if it is gone (the agent retires it)."""
    try:
        os.write(spare.job, blob)  # fits the empty pipe whole: never blocks
    except OSError:
        return False
    os.close(spare.job)
    spare.job = -1
    return True


def close(spare: Spare) -> None:
    """Close the agent's ends of a spare that will get no job: without its job pipe it exits on its own."""
    for fd in spare.fds():
        os.close(fd)
    spare.job = spare.pipe = -1
    spare.pidfd = None


# -- in the spare ------------------------------------------------------------------------


def wait_for_job(job_fd: int, pages_file: Path) -> Optional[tuple[dict, bool]]:
    """In a spare: fault in the learnt pages, then wait for the job. None when the agent retires it."""
    try:
        _populate(pages_file)
    except Exception:  # noqa: BLE001 - a spare that faulted in less is still a fresh child
        pass
    header = _read_exactly(job_fd, _HEADER.size)
    if len(header) < _HEADER.size:
        return None
    blob = _read_exactly(job_fd, _HEADER.unpack(header)[0])
    os.close(job_fd)
    return pickle.loads(blob)


def _read_exactly(fd: int, size: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = os.read(fd, size - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _populate(pages_file: Path) -> None:
    try:
        runs = array("Q", pages_file.read_bytes())
    except OSError:
        return
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    for i in range(0, len(runs) - 1, 2):
        # A range the parent no longer maps is refused (ENOMEM), one not writable too: nothing is forced.
        if madvise(runs[i], runs[i + 1], _MADV_POPULATE_WRITE) != 0 and ctypes.get_errno() == 22:
            return  # EINVAL: this kernel has no MADV_POPULATE_WRITE


# -- in a node, at its end -------------------------------------------------------------------


def record_written_pages(pages_file: Path) -> None:
    """In a node forked by the agent, at its end: the pages it wrote (those of its writable private
    mappings now its alone), added to what the spares fault in. Best effort: a kernel that hides the
    flags, or a full disk, leaves spares to fault in less."""
    try:
        learnt = set(_runs_to_pages(array("Q", pages_file.read_bytes())))
    except OSError:
        learnt = set()
    try:
        learnt.update(written_pages())
    except OSError:
        return
    pages = sorted(learnt)[:PAGES_MAX]
    tmp = pages_file.with_name(f".{pages_file.name}.{os.getpid()}")
    try:
        tmp.write_bytes(_pages_to_runs(pages).tobytes())
        os.replace(tmp, pages_file)
    except OSError:
        tmp.unlink(missing_ok=True)


def written_pages() -> list[int]:
    """Addresses of the pages of this process's writable private mappings that it maps alone: in a forked
    child, those it wrote (copied from its parent's, or new) since the fork."""
    found: list[int] = []
    with open("/proc/self/maps") as maps, open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
        for line in maps:
            fields = line.split()
            if len(fields) < 5 or fields[1] != "rw-p" or (len(fields) > 5 and fields[5] in _NOT_HEAP):
                continue  # not a private writable mapping, or the stack (written by any code, and not shared)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if end - start > _MAPPING_MAX:
                continue  # a large reservation (an allocator's, a library's): its map alone would be megabytes to read
            entries = array("Q", os.pread(pagemap.fileno(), (end - start) // _PAGE * 8, start // _PAGE * 8))
            both = _PRESENT | _EXCLUSIVE
            found.extend(start + i * _PAGE for i, e in enumerate(entries) if e & both == both)
    return found


def _pages_to_runs(pages: list[int]) -> array:
    runs = array("Q")
    for page in pages:
        if runs and runs[-2] + runs[-1] == page:
            runs[-1] += _PAGE
        else:
            runs.extend((page, _PAGE))
    return runs


def _runs_to_pages(runs: array) -> list[int]:
    return [runs[i] + k for i in range(0, len(runs) - 1, 2) for k in range(0, runs[i + 1], _PAGE)]
