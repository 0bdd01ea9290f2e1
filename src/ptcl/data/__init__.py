"""Datasets, scenario (class order and task splits), transforms and the feature cache."""
