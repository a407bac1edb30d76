"""What every experiment run shares: config validation and its workdir.

The package, a module a job: ``checks`` (a config's values checked, a config file read),
``identity`` (a run's identity and the workdir that records it), ``records`` (the JSON / JSONL
files a run writes and reads back, ``finished.json``, plots) and ``provenance`` (the machine and
the code's commit a result came from). Every public name is here: ``runs.X``."""

from ssah_jax.runs.checks import DTYPES, ConfigError, check, check_parses, config_from_file, dtype, get, set_values
from ssah_jax.runs.identity import (
    BOOKKEEPING,
    IDENTITY,
    Added,
    added_at_old_value,
    determining,
    differences,
    fingerprint,
    holds_results,
    leaves,
    prepare_workdir,
)
from ssah_jax.runs.provenance import code_version, describe_machine, machine
from ssah_jax.runs.records import (
    FINISHED,
    WorkdirError,
    mark_finished,
    pyplot,
    read_finished,
    read_json,
    read_jsonl,
    write_atomic,
)

__all__ = [
    "DTYPES",
    "ConfigError",
    "get",
    "check",
    "check_parses",
    "dtype",
    "config_from_file",
    "set_values",
    "IDENTITY",
    "BOOKKEEPING",
    "WorkdirError",
    "Added",
    "added_at_old_value",
    "leaves",
    "determining",
    "fingerprint",
    "differences",
    "prepare_workdir",
    "holds_results",
    "FINISHED",
    "write_atomic",
    "mark_finished",
    "read_finished",
    "read_json",
    "read_jsonl",
    "pyplot",
    "code_version",
    "machine",
    "describe_machine",
]
