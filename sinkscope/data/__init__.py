"""Corpora: the synthetic audio-visual speech generator (and, later, the loader for it and LRS2/LRS3)."""
