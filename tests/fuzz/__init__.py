"""The fuzz suite: corrupted inputs across every boundary, each run as a user would run it (see harness.py)."""
