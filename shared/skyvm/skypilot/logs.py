"""A job's log read from an offset: each job's log is streamed once, never fetched whole per poll.

SkyPilot's ``tail_logs`` has no "from here on": a poll that asks ``follow=False`` gets the whole
log again, O(n^2) over a run. ``LogFollowers`` asks SkyPilot once per job with ``follow=True``
(in a thread, beside the bridge's other calls) and keeps what came until a reader takes it:
``read(cluster, job_id, offset)`` answers the text past ``offset`` and the offset after it, as
``follow=False`` would have, without asking SkyPilot again. Text a reader took is dropped.
``final`` (the reader knows the job is over) waits for the stream's end, so that read has it all.

The first read of a job in a process (and a reader behind what was dropped: another process's
offset, a read from 0 again) gets the log as it is now with one ``follow=False`` fetch, so a read
never misses what is already written; the job's follower then starts past that text.

Works over any bridge with ``tail_logs`` and ``jobs_logs`` (the SDK adapter, the tests' stand-ins).
May import: the standard library and ``skyvm.skypilot.interface``.
"""

from __future__ import annotations

import logging
import threading
from typing import Optional

log = logging.getLogger("skyvm.skypilot")
# How long a final read waits for a finished job's stream to end (it ends as soon as SkyPilot has sent the rest).
FINAL_WAIT_S = 120.0
# Streams open at once per bridge, at most: each holds one of the API server's log threads (128 per server
# process). Past this, a job's log is fetched whole per read, as before streams.
MAX_FOLLOWING = 64


class _Follower:
    """One job's streamed log: text from absolute character ``base`` on, until a reader takes it."""

    def __init__(self, skip: int):
        self.lock = threading.Lock()
        self.skip = skip  # characters a whole fetch gave already: streamed again, not kept
        self.streamed = 0  # characters streamed so far, from the log's start
        self.base = skip
        self.chunks: list[str] = []
        self.done = threading.Event()

    def add(self, line: str) -> None:
        chunk = line + "\n"
        with self.lock:
            before, self.streamed = self.streamed, self.streamed + len(chunk)
            if self.streamed > self.skip:
                self.chunks.append(chunk[max(0, self.skip - before):])

    def take(self, offset: int) -> Optional[tuple[str, int, bool]]:
        """The text past ``offset``, the offset after it, and whether the stream is over and all of it
        taken; None when ``offset`` lies before what is kept (that text went to an earlier reader)."""
        with self.lock:
            if offset < self.base:
                return None
            start, text = self.base, "".join(self.chunks)
            end = start + len(text)
            self.base, self.chunks = end, []
            return text[offset - start:], max(offset, end), self.done.is_set()


class LogFollowers:
    """The followed logs of one bridge's jobs (see the module's docstring)."""

    def __init__(self, bridge, max_following: int = MAX_FOLLOWING):
        self.bridge = bridge
        self.max_following = max_following
        self._lock = threading.Lock()
        self._followers: dict[tuple, _Follower] = {}

    def _fetch(self, key: tuple, on_log, follow: bool):
        managed, cluster, job_id = key
        if managed:
            return self.bridge.jobs_logs(job_id, on_log=on_log, follow=follow)
        return self.bridge.tail_logs(cluster, job_id, on_log=on_log, follow=follow)

    def _follow(self, key: tuple, follower: _Follower) -> None:
        try:
            self._fetch(key, follower.add, True)
        except Exception as exc:  # noqa: BLE001 - the next read fetches the log whole, and says why if that fails
            log.debug("following the log of %s failed: %s", key, exc)
        finally:
            follower.done.set()

    def read(self, cluster_name: Optional[str], job_id: int, offset: int = 0, managed: bool = False, final: bool = False) -> list:
        key = (bool(managed), None if managed else cluster_name, job_id)
        with self._lock:
            follower = self._followers.get(key)
        if follower is not None and final:
            # The job is over, so its stream ends soon: what it still carries belongs in this read.
            follower.done.wait(FINAL_WAIT_S)
        taken = follower.take(offset) if follower is not None else None
        if taken is not None:
            text, end, finished = taken
            if finished:
                with self._lock:  # the stream is over and read to its end: a later read fetches anew
                    if self._followers.get(key) is follower:
                        del self._followers[key]
            return [text, end]
        lines: list[str] = []
        self._fetch(key, lines.append, False)
        text = "".join(line + "\n" for line in lines)
        with self._lock:
            following = sum(1 for f in self._followers.values() if not f.done.is_set())
            if not final and key not in self._followers and following < self.max_following:
                self._followers[key] = follower = _Follower(len(text))
                threading.Thread(target=self._follow, args=(key, follower), daemon=True, name=f"skyvm-log-{job_id}").start()
        return [text[offset:], max(offset, len(text))]
