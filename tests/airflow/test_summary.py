"""Each skyvm task's summary where an Airflow user looks (airflow_skyvm.summary): at the end of the
task's log, and in its XCom ``skyvm`` for the DAG's other tasks. Run with dag.test() against the
real metadata DB, on real containers; each row is checked against what its node saw inside."""

from __future__ import annotations

from test_operator import af_containers, run_dag, xcom


def summary_block(text: str, task: str) -> list[str]:
    """The table logged after ``skyvm: summary of task TASK:``, up to its total row."""
    lines = text.splitlines()
    (start,) = [i for i, line in enumerate(lines) if line.rstrip().endswith(f"skyvm: summary of task {task}:")]
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("total"))
    return lines[start + 1 : end + 1]


def test_each_task_logs_its_nodes_summary_and_writes_it_to_the_xcom_skyvm_sync_deferred_and_failed(dags, capfd, caplog):
    caplog.set_level("INFO")
    dr, states = run_dag(dags.summary_dag)
    assert states == {"sync": "success", "deferred": "success", "fails": "failed", "reads": "success"}
    seen = {t: xcom(dr, t) for t in ("sync", "deferred")}
    summaries = {t: xcom(dr, t, key="skyvm") for t in ("sync", "deferred", "fails")}
    for task, summary in summaries.items():
        (row,) = summary["rows"]
        assert (row["node"], row["backend"], summary["nodes"], summary["unpriced"]) == (task, "local", 1, [])
        assert row["placement"] == f"local ({row['cluster']})" and row["duration_s"] > 0
        assert (row["hourly_price"], row["cost"], summary["total_cost"]) == (0.0, 0.0, 0.0)
    for task, inside in seen.items():
        row = summaries[task]["rows"][0]
        # The container and limits the XCom names are those the node ran in (the deferrable one's too).
        assert row["cluster"] == inside["cluster"]
        assert (float(row["limits"]["cpus"]), float(row["limits"]["memory"])) == (inside["cpus"], inside["memory_gib"])
    assert (seen["sync"]["cpus"], seen["deferred"]["cpus"]) == (1.25, 0.5)
    # A downstream task reads the XCom as any task of the DAG may.
    assert xcom(dr, "reads") == [seen["sync"]["cluster"]]

    out = capfd.readouterr()
    text = out.out + out.err + caplog.text
    for task, summary in summaries.items():
        row = summary["rows"][0]
        header, line, total = summary_block(text, task)
        assert header.split() == ["NODE", "PLACEMENT", "LIMITS", "DURATION", "PRICE", "COST"]
        assert line.split()[:3] == [task, "local", f"({row['cluster']})"] and f"{row['duration_s']:.1f}s" in line
        assert total.split()[:4] == ["total", "1", "node(s)", "$0.000000"]  # (Airflow's console log adds the logger's name)
    # Once per task: the run the operator closed did not log the table again.
    assert "skyvm summary of run" not in text
    assert af_containers(dags.summary_dag.dag_id) == []
