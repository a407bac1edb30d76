"""Experiments: ``<name>.py:run(config, workdir)``, driven by ``configs/<name>.py``."""
