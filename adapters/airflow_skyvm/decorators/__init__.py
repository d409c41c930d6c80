"""Airflow's provider layout: the decorators of skyvm's Airflow adapter (see its module). May import: nothing."""
