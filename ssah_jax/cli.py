"""``ssah-jax <experiment> --config=configs/<experiment>.py:<preset> --workdir=DIR [--config.k=v]``.

Each experiment is ``experiments/<name>.py:run(config, workdir)``. Config keys are locked:
an unknown ``--config.key`` is an error naming it, and each experiment validates its values.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config: path/to/config.py:preset.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for outputs; re-running in it resumes.")


def experiments() -> list[str]:
    import experiments as package

    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))


def _main(argv: list[str]) -> None:
    names = experiments()
    if len(argv) != 2 or argv[1] not in names:
        raise app.UsageError(f"usage: ssah-jax <experiment> --config=... --workdir=...; experiments: {names}")
    if _CONFIG.value is None:
        raise app.UsageError(f"--config is required, e.g. --config=configs/{argv[1]}.py:smollm2")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint file operation at INFO
    module = importlib.import_module(f"experiments.{argv[1]}")
    module.run(_CONFIG.value, _WORKDIR.value)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        # ml_collections reports an unknown --config.<key> as a bare KeyError/AttributeError.
        overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
        sys.exit(f"ssah-jax: unknown config key {e} (overrides given: {overrides}); "
                 "see the config file for the valid keys")
    except flags.Error as e:
        sys.exit(f"ssah-jax: {e}")


def main() -> None:
    app.run(_main, argv=sys.argv, flags_parser=_parse_flags)


if __name__ == "__main__":
    main()
