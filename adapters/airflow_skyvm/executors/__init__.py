"""Airflow's provider layout: the executors of skyvm's Airflow adapter (see its module). May import: nothing."""
