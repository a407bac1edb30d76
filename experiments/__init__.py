"""Experiments: ``<name>.py:run(config, workdir)``, driven by ``configs/<name>.py``."""

import pkgutil


def names() -> list[str]:
    """The experiments (``ssah-jax <name>``): this package's public modules and packages."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
