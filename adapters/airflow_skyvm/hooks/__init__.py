"""Airflow's provider layout: the hooks of skyvm's Airflow adapter (see its module). May import: nothing."""
