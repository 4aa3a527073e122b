"""Corpora: the synthetic audio-visual speech generator (`synth`), corpus layouts (`layouts`), media constants and
readers (`media`), and the loader for the synthetic corpus and LRS2/LRS3 (`dataset`)."""
