"""Reporting: the leaderboard of runs and the report page of an experiment."""
