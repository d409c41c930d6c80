"""Airflow's provider layout: the triggers of skyvm's Airflow adapter (see its module). May import: nothing."""
