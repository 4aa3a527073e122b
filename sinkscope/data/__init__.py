"""Corpora: the synthetic audio-visual speech generator (`synth`) and the loader for it and LRS2/LRS3 (`dataset`)."""
