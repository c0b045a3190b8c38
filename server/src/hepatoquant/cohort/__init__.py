"""Cohorts: many slides through the same analysis, on this machine (a process pool) or a Ray cluster."""
