"""Airflow adapter of skyvm (SkyVMOperator, @task.skyvm, SkyVMExecutor): built by a later issue."""
