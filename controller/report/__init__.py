"""Pareto fronts, JSON/HTML reports and plots."""
