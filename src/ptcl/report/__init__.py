"""Run outputs: plots and comparison tables."""
