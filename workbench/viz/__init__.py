"""Plots for the workbench notebooks and reports (matplotlib; imported only when you plot)."""
