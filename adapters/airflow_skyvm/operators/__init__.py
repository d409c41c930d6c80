"""Airflow's provider layout: the operators of skyvm's Airflow adapter (see its module). May import: nothing."""
