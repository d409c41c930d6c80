"""The DAG of test_canary.py's supervised run: a node prints its secret and fails; then the task, in
the worker, logs the secret (read by now) on skyvm's loggers, a library's and the operator's own,
through a handler added only then, and fails with an exception quoting it. The secret comes from
$CANARY_REDACT, which the test sets; $CANARY_LATE_LOG is where the late handler writes."""

from __future__ import annotations

import datetime
import logging
import os

from airflow.sdk import DAG

from airflow_skyvm.operators.skyvm import SkyVMOperator

LATE_LOGGERS = ("skyvm", "skyvm.local", "skyvm.skypilot", "skyvm.api", "skyvm.connectors.aws", "botocore.credentials")


class LateLeaks(SkyVMOperator):
    def execute(self, context):
        try:
            super().execute(context)  # reads the node's secret, and the node prints it
        except Exception as exc:
            failure = exc
        else:
            raise AssertionError("the node was meant to fail")
        secret = os.environ["CANARY_REDACT"]
        late = logging.FileHandler(os.environ["CANARY_LATE_LOG"])
        late.setFormatter(logging.Formatter("%(name)s|%(message)s"))
        logging.getLogger("skyvm").addHandler(late)
        logging.getLogger("botocore").addHandler(late)
        try:
            for name in LATE_LOGGERS:
                logging.getLogger(name).warning("late %s on %s", secret, name)
            self.log.warning("the operator's own logger: %s", secret)
            try:
                raise ValueError(f"an SDK error quoting {secret}")
            except ValueError:
                logging.getLogger("skyvm.connectors.aws").exception("late exception")
                self.log.exception("late exception on the operator's logger")
        finally:
            logging.getLogger("skyvm").removeHandler(late)
            logging.getLogger("botocore").removeHandler(late)
            late.close()
        raise RuntimeError(f"the task fails quoting {secret}") from failure


with DAG("skyvm_redact", schedule=None, start_date=datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)) as redact_dag:
    LateLeaks(
        task_id="late_leaks",
        bash_command='echo "the node prints $CANARY_TOKEN"; echo "and fails with $CANARY_TOKEN" >&2; exit 3',
        sky_settings={"cpus": 0.5, "memory": 0.5, "secrets": {"CANARY_TOKEN": "env:CANARY_REDACT"}},
        skyvm_conn_id=None,
    )
