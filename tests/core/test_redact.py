"""Redaction that no logger, handler or late setup can bypass.

Every secret is a unique marker registered the way skyvm registers what it reads. Handlers are added
only AFTER the secret was read (as Airflow's per-task handler, Prefect's API handler or a user's own
would be), on ``skyvm``, its children, the root logger and loggers that are not skyvm's. What those
handlers print may hold no marker, and must still hold the rest of each record: the masked message,
the exception's type and frames, the ``extra`` fields.
"""

from __future__ import annotations

import io
import linecache
import logging
import os
import uuid

import pytest

from skyvm import redact

# skyvm's own loggers and ones it does not own but its adapters log through (Prefect's run loggers,
# Airflow's task logger) or a library logs on (botocore).
SKYVM_LOGGERS = ("skyvm", "skyvm.local", "skyvm.skypilot", "skyvm.api", "skyvm.connectors.aws", "skyvm.pool")
OTHER_LOGGERS = ("prefect.task_runs", "prefect.flow_runs", "airflow.task", "botocore.credentials")


def marker(name: str) -> str:
    return f"CANARY-{name}-{uuid.uuid4().hex}"


class Late:
    """A handler added after the secrets were read, printing everything a formatter can print of a record."""

    FORMAT = "%(name)s|%(levelname)s|%(message)s|%(extra_field)s"

    def __init__(self, *names: str):
        self.stream = io.StringIO()
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setFormatter(logging.Formatter(self.FORMAT, defaults={"extra_field": "-"}))
        self.loggers = [logging.getLogger(n) for n in names]
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.addHandler(self.handler)
            lg.setLevel(logging.DEBUG)

    def text(self) -> str:
        return self.stream.getvalue()

    def close(self) -> None:
        for lg, level in zip(self.loggers, self.levels):
            lg.removeHandler(self.handler)
            lg.setLevel(level)


@pytest.fixture
def late():
    made = []

    def make(*names: str) -> Late:
        made.append(Late(*names))
        return made[-1]

    yield make
    for handler in made:
        handler.close()


def log_everything(name: str, secret: str) -> None:
    """One record of each kind that can carry a secret, on logger ``name``."""
    log = logging.getLogger(name)
    log.info("message %s on %s", secret, name)  # an argument
    log.warning(f"f-string {secret} on {name}")  # the message itself
    log.info("mapping %(token)s on %(where)s", {"token": secret, "where": name})
    log.info("extra field on %s", name, extra={"extra_field": f"x-{secret}-x"})
    try:
        try:
            raise KeyError(f"inner {secret}")
        except KeyError as inner:
            raise RuntimeError(f"outer error quoting {secret}") from inner
    except RuntimeError:
        log.exception("failed on %s", name)


def assert_scrubbed(text: str, secret: str, names) -> None:
    assert secret not in text
    for name in names:  # every record arrived, masked rather than dropped
        assert f"message *** on {name}" in text, name
        assert f"f-string *** on {name}" in text
        assert f"mapping *** on {name}" in text
        assert f"extra field on {name}" in text
        assert f"failed on {name}" in text
    # The exception chain as logging prints it: types and frames kept, texts masked.
    assert "RuntimeError: outer error quoting ***" in text and "KeyError: 'inner ***'" in text
    assert "in log_everything" in text and "The above exception was the direct cause" in text


def test_handlers_added_after_the_secret_never_see_it_on_any_logger(late):
    secret = marker("late")
    redact.register(secret)
    own, root, others = late(*SKYVM_LOGGERS), late(""), late(*OTHER_LOGGERS)

    for name in SKYVM_LOGGERS + OTHER_LOGGERS:
        log_everything(name, secret)

    assert_scrubbed(own.text(), secret, SKYVM_LOGGERS)
    assert_scrubbed(others.text(), secret, OTHER_LOGGERS)
    assert_scrubbed(root.text(), secret, SKYVM_LOGGERS + OTHER_LOGGERS)  # through propagation
    assert "|x-***-x" in own.text()  # skyvm's loggers mask extra fields too


def test_a_secret_registered_after_the_handler_is_hidden_too(late):
    handler = late("skyvm.local", "")
    secret = marker("later")
    redact.register(secret)
    logging.getLogger("skyvm.local").error("bad %s", secret)
    logging.getLogger("some.library").error("bad %s", secret)
    assert secret not in handler.text() and handler.text().count("bad ***") == 3  # child's handler + root twice


def test_a_factory_installed_later_that_drops_ours_is_wrapped_again(late):
    first = marker("first")
    redact.register(first)
    ours = logging.getLogRecordFactory()
    handler = late("skyvm.api", "other.library")
    try:
        logging.setLogRecordFactory(logging.LogRecord)  # someone replaces the factory without chaining it
        logging.getLogger("skyvm.api").error("own logger still masked: %s", first)  # the filter on skyvm's loggers
        second = marker("second")
        redact.register(second)  # the next secret read puts scrubbing back in front
        logging.getLogger("other.library").error("any logger again: %s %s", first, second)
    finally:
        logging.setLogRecordFactory(ours)
    text = handler.text()
    assert first not in text and second not in text
    assert "own logger still masked: ***" in text and "any logger again: *** ***" in text


def test_a_factory_that_chains_ours_keeps_it_and_is_kept(late):
    secret = marker("chained")
    redact.register(secret)
    ours = logging.getLogRecordFactory()
    seen = []

    def theirs(*args, **kwargs):
        record = ours(*args, **kwargs)
        seen.append(record.getMessage())
        return record

    logging.setLogRecordFactory(theirs)
    handler = late("third.party")
    try:
        redact.register(marker("another"))
        assert logging.getLogRecordFactory() is theirs  # chained already: not wrapped twice
        logging.getLogger("third.party").warning("token %s", secret)
    finally:
        logging.setLogRecordFactory(ours)
    assert "token ***" in handler.text() and secret not in handler.text() + "".join(seen)


def test_stack_info_and_a_secret_in_a_source_line(late):
    secret = marker("source")
    redact.register(secret)
    handler = late("skyvm.local")
    # Code whose own source line holds the secret (a literal in a user's script): its frames print it.
    filename = f"<canary-{uuid.uuid4().hex}>"
    source = f"def leaky(log):\n    log.info('with stack', stack_info=True); raise ValueError('{secret}')\n"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict = {}
    exec(compile(source, filename, "exec"), namespace)
    log = logging.getLogger("skyvm.local")
    try:
        namespace["leaky"](log)
    except ValueError:
        log.exception("source line")
    finally:
        linecache.cache.pop(filename, None)
    text = handler.text()
    assert secret not in text
    assert "Stack (most recent call last)" in text and "ValueError: ***" in text and "source line" in text


def test_an_exception_group_is_printed_masked(late):
    secret = marker("group")
    redact.register(secret)
    handler = late("skyvm.watcher")
    try:
        raise ExceptionGroup("several", [OSError(f"disk {secret}"), ValueError("fine")])
    except ExceptionGroup:
        logging.getLogger("skyvm.watcher").exception("group")
    assert secret not in handler.text() and "OSError: disk ***" in handler.text() and "ValueError: fine" in handler.text()


def test_a_broken_record_is_reported_masked(late, capsys):
    secret = marker("broken")
    redact.register(secret)
    late("skyvm.broken")
    log = logging.getLogger("skyvm.broken")
    log.propagate = False  # pytest's own capture handler raises on a broken record instead of reporting it
    try:
        log.error("two %s %s", secret)  # one argument short: logging prints its parts
    finally:
        log.propagate = True
    err = capsys.readouterr().err
    assert "--- Logging error ---" in err and secret not in err and "***" in err


def test_redact_masks_longest_first_in_one_pass_and_leaves_the_rest():
    short, long = marker("s"), None
    long = short + "-and-more"
    odd = "pa$$.w*rd(" + uuid.uuid4().hex  # regex characters are literal
    redact.register(short, long, odd, "tiny", 12345678, None)
    assert redact.redact(f"a {long} b {short} c {odd} d") == "a *** b *** c *** d"
    assert redact.redact("tiny and 12345678 stay") == "tiny and 12345678 stay"  # too short / not text
    assert redact.redact(None) is None and redact.redact(b"bytes") == b"bytes"
    clean = "nothing to hide " + uuid.uuid4().hex
    assert redact.redact(clean) is clean


def test_listeners_hear_of_known_and_new_secrets():
    before = marker("before")
    redact.register(before)
    heard: list[str] = []
    redact.add_listener(heard.append)
    redact.add_listener(heard.append)  # once per listener
    after = marker("after")
    redact.register(after, after)

    def broken(_value):
        raise RuntimeError("an engine's masker failing")

    redact.add_listener(broken)
    redact.register(marker("still-registered"))
    assert before in heard and heard.count(after) == 1


def test_a_node_that_prints_its_secret_and_fails_with_it(docker_engine, late):
    from skyvm.api import NodeFailed, Run

    secret = marker("node")
    os.environ["SKYVM_TEST_REDACT_SECRET"] = secret
    forwarded = late("adapter.forwarding", "skyvm.api")
    config = {"defaults": {"cpus": 0.5, "memory": 0.5, "secrets": {"TOKEN": "env:SKYVM_TEST_REDACT_SECRET"}}}
    with Run(config) as run:
        # Forwarded as the adapters do: each node line to an engine's logger, whose handler came later.
        forward = logging.getLogger("adapter.forwarding").info
        handle = run.submit_command('echo "token is $TOKEN"; echo "failing with $TOKEN" >&2; exit 4', node="leaky", on_log=forward)
        with pytest.raises(NodeFailed) as err:
            handle.result(120)
        logging.getLogger("skyvm.api").error("node failed", exc_info=err.value)
    text = forwarded.text()
    assert "token is ***" in text and "failing with ***" in text
    assert secret not in text + handle.logs() + str(err.value)
