"""redaction: what scrubbing secrets from every log record costs (skyvm.redact).

Each arm is a fresh process (a registered secret stays for the process's life), which logs N
records of a node's log line through a handler, with an argument, as skyvm's loggers do:

- no secret registered: nothing is installed, so this is plain logging;
- 1 and 50 secrets registered: every record is scrubbed at creation (the LogRecord factory) and
  its ``extra`` fields by the logger's filter;

and times ``redact()`` on a 200-character line with 50 secrets: one regex alternation (what
skyvm does) against one ``str.replace`` per secret (what it did).

Targets: a record with 50 secrets costs at most 2.5x one with none (a few microseconds on a
line that is about to be written and shipped anyway); the single pass beats the N scans.
"""

from __future__ import annotations

import json
import subprocess
import sys

from bench import scenario
from bench.common import BenchError

_ARM = r"""
import io, json, logging, sys, time, uuid
from skyvm import redact
k, n = int(sys.argv[1]), int(sys.argv[2])
secrets = [f"secret-{uuid.uuid4().hex}" for _ in range(k)]
redact.register(*secrets)
log = logging.getLogger("skyvm.local")
log.propagate = False
stream = io.StringIO()
log.addHandler(logging.StreamHandler(stream))
log.setLevel(logging.INFO)
leak = secrets[0] if secrets else "nothing"
t0 = time.perf_counter()
for i in range(n):
    log.info("node %s: line %d of its log, quoting %s", "leaky", i, leak)
per_record = (time.perf_counter() - t0) / n
assert not secrets or (secrets[0] not in stream.getvalue() and stream.getvalue().count("***") == n)
line = ("x" * 180) + leak
t0 = time.perf_counter()
for _ in range(n):
    redact.redact(line)
one_pass = (time.perf_counter() - t0) / n
t0 = time.perf_counter()
for _ in range(n):
    text = line
    for s in sorted(secrets, key=len, reverse=True):
        if s in text:
            text = text.replace(s, "***")
per_secret = (time.perf_counter() - t0) / n
print(json.dumps({"record": per_record, "one_pass": one_pass, "per_secret": per_secret}))
"""


def _arm(k: int, n: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _ARM, str(k), str(n)], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise BenchError(f"redaction arm with {k} secrets failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


@scenario(
    "redaction",
    env="core",
    help="per-record cost of scrubbing secrets from every log record, with 0, 1 and 50 secrets",
    n=50000,
    reps=5,
    smoke_n=200,
    n_means="records per arm",
)
def redaction_bench(b) -> None:
    labels = {0: "record, no secret registered", 1: "record, 1 secret", 50: "record, 50 secrets"}

    def arm(k: int):
        def go(rep: int) -> None:
            got = _arm(k, b.n)
            b.add(labels[k], got["record"] * 1e6, unit="us")
            if k == 50:
                b.add("redact(), 50 secrets, one regex pass", got["one_pass"] * 1e6, unit="us")
                b.add("redact(), 50 secrets, one replace per secret", got["per_secret"] * 1e6, unit="us")

        return go

    b.alternate({labels[k]: arm(k) for k in labels})
    b.check(all(b.med(label) is not None for label in labels.values()), "an arm recorded nothing")
    if b.smoke:
        return
    b.ratio("record: 1 secret / none", labels[1], labels[0])
    cost = b.ratio("record: 50 secrets / none", labels[50], labels[0])
    passes = b.ratio("redact(): one pass / N replaces", "redact(), 50 secrets, one regex pass", "redact(), 50 secrets, one replace per secret")
    b.target("record with 50 secrets vs none", cost, "<=", 2.5, "x", "scrubbing must stay a small part of a log record's cost")
    b.target("redact(): one regex pass vs N replaces", passes, "<=", 1.0, "x", "one alternation should beat one scan per secret")
