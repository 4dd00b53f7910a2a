"""Experiments over many students: sweep, scan, budgeted selection, frontier (runs.py); markdown and plots (report.py)."""
