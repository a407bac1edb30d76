"""``ssah-jax <experiment> --config=configs/<experiment>.py:<preset> --workdir=DIR [--config.k=v]``.

Each experiment is ``experiments/<name>.py`` (or a package) ``:run(config, workdir, overwrite=...)``;
``ssah-jax --help`` lists them with their presets and ``ssah-jax <experiment> --help`` shows
an experiment's config keys. Config keys are locked: an unknown ``--config.key`` is an error
naming it, and each experiment validates its values before it makes its workdir.

Expected errors (a bad config value, missing or malformed data, a damaged checkpoint, a missing
file, an unusable workdir) print one line ``ssah-jax: <what>`` to stderr and exit with status 2,
removing a workdir this invocation made and left without results; ``--traceback`` (or
``SSAH_TRACEBACK=1``) shows the full traceback instead.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import os
import re
import shutil
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config: path/to/config.py:preset.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for outputs; re-running in it resumes.")
_OVERWRITE = flags.DEFINE_boolean("overwrite", False, "Clear the workdir of an earlier run first and start afresh.")
_TRACEBACK = flags.DEFINE_boolean("traceback", False, "Show the full traceback of an error (or SSAH_TRACEBACK=1).")
_MULTIHOST = flags.DEFINE_boolean("multihost", False, "Join the other processes of a multi-host run (jax.distributed; "
                                  "the cluster is detected unless the next three flags are given).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: how many processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index, 0 .. num_processes - 1.")
_DEVICES = flags.DEFINE_integer("devices", 8, "plan: how many devices (fake CPU ones) the run would have.")
_MEMORY_GB = flags.DEFINE_float("memory_gb", None, "plan: GiB of memory per device (default: the TPU's, else 60).")
_TOPOLOGY = flags.DEFINE_string("topology", None, "plan: a TPU topology to compile for, e.g. v5e:4x4 (needs libtpu).")
_PROMPT_TOKENS = flags.DEFINE_integer("prompt_tokens", 256, "plan: prompt length of the decoding plans.")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # beside experiments/ in the checkout
HELP = ("-h", "--help")
TRACEBACK_ENV = "SSAH_TRACEBACK"
_LINES = re.compile(r"\s*\n\s*")  # a message's line breaks, collapsed to one space
USAGE = ("usage: ssah-jax <experiment> --config=configs/<experiment>.py[:<preset>] --workdir=DIR "
         "[--config.<key>=<value> ...] [--overwrite] [--traceback] [--multihost ...]")
PLAN_USAGE = ("usage: ssah-jax plan --config=configs/<experiment>.py[:<preset>] [--config.<key>=<value> ...] "
              "[--devices=8] [--memory_gb=GiB] [--topology=v5e:4x4] [--prompt_tokens=256]")
PLAN_HELP = f"""{PLAN_USAGE}

The memory bill of an experiment before it runs: its trainings (the step, with the config's
batch, length, dtype, mesh, layout and remat) and its evaluation's decoding (batch_size
prompts of --prompt_tokens, max_new_tokens more) are compiled from abstract weights (no
weights read, no device used) for --devices fake CPU devices, or for a TPU topology ahead of
time (--topology, with libtpu: pip install -e '.[tpu]'). Each bill (parameters, optimizer
state, activations and temporaries per device) is set against --memory_gb (default: the TPU's
HBM, else 60 GiB: the 75% of an 80 GB H100 / A100 that JAX's GPU allocator takes by default,
XLA_PYTHON_CLIENT_MEM_FRACTION) with "fits" or "DOES NOT FIT", and then the first setting of
remat, the scanned layout or micro-batches that fits. The model's architecture comes from its
config.json or GGUF metadata (the papers' hub models are known offline)."""
SWEEP_USAGE = ("usage: ssah-jax sweep --config=configs/sweeps/<name>.py[:<preset>] --workdir=DIR "
               "[--config.<key>=<value> ...] [--overwrite] [--traceback]")
SWEEP_HELP = f"""{SWEEP_USAGE}

A grid of experiment runs. The sweep config names an experiment, its base config and preset,
fixed overrides (config.set), the points (config.points: a list of key=value overrides, times
the product of config.grid, times config.seeds) and the metrics to collect; each point is the
ordinary `ssah-jax <experiment>` command in DIR/runs/<point>/ (its log: DIR/logs/<point>.log).
Re-running the command skips finished points and resumes the others (each point resumes like
its experiment); a point that fails is recorded with its error, and a crash is retried
config.retries times. At the end: DIR/sweep.csv (one row per point), DIR/report.md (mean and
spread over seeds, a plot per swept key, the choices of config.select) and DIR/selected.json.

Executors (--config.executor):
  local  this machine, config.parallel points at a time (the GPUs dealt out between them)
  ray    each point a Ray task (config.ray: address "" starts a local cluster, "auto" or
         host:port joins one; num_cpus / num_gpus / tpus per point); pip install -e '.[ray]'
  print  prints one shell command per point still to run, on stdout alone (SLURM arrays,
         xpk, or scripts/launch_tpu_pod.sh for a point that needs a pod slice); once they
         have run, the same command tabulates them (a point that ran to its end is finished,
         however it was run)

Shipped sweeps (`ssah-jax sweep --config=<file> --help` shows one's keys):"""
FLAGS_HELP = """\
flags:
  --config=FILE[:PRESET]  the experiment's config file and preset (default: the file's first preset)
  --config.<key>=<value>  set one config key (`ssah-jax <experiment> --help` lists them)
  --workdir=DIR           where the outputs go; re-running the same command resumes, and a re-run
                          that changes a key the results depend on is refused, naming the key
  --overwrite             clear DIR (the workdir of an earlier run) and start afresh
  --traceback             show the full traceback of an error (also: SSAH_TRACEBACK=1)
  --multihost             one process of a multi-host run (a TPU pod slice, a multi-node GPU job):
                          every host runs the same command; JAX detects the cluster (Cloud TPU VM,
                          SLURM, Open MPI, Kubernetes) or takes --coordinator_address=HOST:PORT
                          --num_processes=N --process_id=I (giving these implies --multihost).
                          Process 0 writes the files; the workdir must be one every host sees

Errors print one line "ssah-jax: <what>" and exit with status 2."""


class _Exit(Exception):
    """An expected failure of the command line itself: one line, status 2."""


def experiments() -> list[str]:
    import experiments as package

    return package.names()


def expected_errors() -> tuple[type[BaseException], ...]:
    """What a run raises for a problem of its inputs rather than of the code: reported in one
    line, without a traceback."""
    from ssah_jax import runs
    from ssah_jax.attribution.kinds import UnitMapMismatch
    from ssah_jax.checkpoints import CheckpointError
    from ssah_jax.data import DataError
    from ssah_jax.models import UnsupportedConfigError

    return (runs.ConfigError, runs.WorkdirError, DataError, CheckpointError, UnsupportedConfigError,
            UnitMapMismatch, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError,
            PermissionError)


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line; an OS error as ``<path>: <what>``."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        message = f"{error.filename}: {error.strerror[0].lower()}{error.strerror[1:]}"
    else:
        message = str(error)
    return _LINES.sub(" ", message).strip()


# ---------------------------------------------------------------------------------------------
# Help


def _module_parts(path: Path) -> tuple[str, Any]:
    """(docstring, PRESETS names) of a Python file, read without importing it."""
    tree = ast.parse(path.read_text())
    presets: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "PRESETS" for t in node.targets):
            if isinstance(node.value, ast.Dict):
                presets = [ast.literal_eval(k) for k in node.value.keys]
            elif isinstance(node.value, ast.Tuple | ast.List):
                presets = [ast.literal_eval(e) for e in node.value.elts]
    return ast.get_docstring(tree) or "", presets


def _describe(name: str) -> tuple[str, str, list[str]]:
    """(one-line description, experiment docstring, presets) of an experiment."""
    import experiments as package

    module = Path(package.__path__[0]) / f"{name}.py"
    doc = _module_parts(module if module.exists() else module.with_suffix("") / "__init__.py")[0]  # or a package
    config = CONFIGS / f"{name}.py"
    presets = _module_parts(config)[1] if config.exists() else []
    doc = plain(doc)
    paragraph = " ".join(doc.split("\n\n", 1)[0].split())
    summary = re.split(r"(?<=\.)\s", paragraph, maxsplit=1)[0]  # its first sentence, whole
    return summary, doc, presets


def plain(text: str) -> str:
    """Docstring markup as plain text: ``name`` and :role:`name` become name."""
    return re.sub(r":\w+:`~?([^`]+)`", r"\1", text).replace("``", "")


def sweep_help() -> str:
    """SWEEP_HELP and each sweep config of ``configs/sweeps/``: its summary and presets."""
    lines = [SWEEP_HELP]
    for path in sorted((CONFIGS / "sweeps").glob("*.py")):
        doc, presets = _module_parts(path)
        summary = plain(" ".join(doc.split("\n\n", 1)[0].split())).removeprefix("Sweep config: ")
        lines += [f"  configs/sweeps/{path.name}: {summary}", f"      presets: {_presets(presets)}"]
    return "\n".join(lines)


def _presets(presets: list[str]) -> str:
    return ", ".join(f"{p} (default)" if i == 0 else p for i, p in enumerate(presets)) or "see its config file"


def overview() -> str:
    lines = [USAGE, "", "Runs one experiment in a workdir. Experiments:"]
    for name in experiments():
        summary, _, presets = _describe(name)
        lines += [f"  {name:10} {summary}", f"  {'':10} presets: {_presets(presets)}"]
    return "\n".join(lines + ["", "ssah-jax plan --config=<an experiment's config>: its memory bill per device "
                                   "(`ssah-jax plan --help`)",
                               "ssah-jax sweep --config=configs/sweeps/<name>.py:<preset> --workdir=DIR: a grid of "
                               "runs (`ssah-jax sweep --help`)",
                               "ssah-jax data fetch|check|list [DATASET ...]: the data kit the experiments read "
                               "(`ssah-jax data --help`)",
                               "ssah-jax judge --rows=PATH --judge=NAME: re-judge an evaluation's answers without "
                               "its model (`ssah-jax judge --help`)", "", FLAGS_HELP])


def _config_spec(args: list[str]) -> str | None:
    """The value of ``--config`` in ``args`` (``--config=X`` or ``--config X``)."""
    for i, arg in enumerate(args):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(args):
            return args[i + 1]
    return None


def load_config(spec: str) -> ConfigDict:
    """``get_config(preset)`` of ``path[:preset]`` (the default preset without one)."""
    path, _, preset = spec.partition(":")
    if not Path(path).is_file():
        raise _Exit(f"--config={spec}: {path}: no such file")
    from ssah_jax.runs import config_from_file

    try:
        return config_from_file(path, preset)
    except SyntaxError as e:
        raise _Exit(f"--config={spec}: {e.filename}:{e.lineno}: {e.msg}") from None
    except ValueError as e:  # an unknown preset; no get_config (a ConfigError)
        raise _Exit(f"--config={spec}: {e}") from None


def key_comments(path: Path) -> dict[str, str]:
    """The comment of each key a config file sets (``c.<key> = ...`` in its ``get_config``): the
    comment lines right above the assignment and the ones beside it, as plain text. The keywords
    of a section (``c.align = ConfigDict(dict(steps=56,  # ...``) are keys of their own
    (``align.steps``), with the comments above and beside them; a line's comment is its first
    keyword's, or the section's when the section starts on that line."""
    import io
    import tokenize

    source = path.read_text()
    comments: dict[int, str] = {}  # line -> its comment
    code_lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
        elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                                tokenize.ENDMARKER):
            code_lines.add(token.start[0])

    def above(line: int) -> list[str]:  # the comment block right above ``line``
        block, line = [], line - 1
        while line in comments and line not in code_lines:
            block.insert(0, comments[line])
            line -= 1
        return block

    def beside(lines: set[int]) -> list[str]:
        return [comments[n] for n in sorted(lines) if n in comments and n in code_lines]

    found: dict[str, str] = {}

    def record(key: str, text: list[str]) -> None:  # a key's first assignment (not a preset's change) says it
        if plain(" ".join(text)):
            found.setdefault(key, plain(" ".join(text)))

    def keywords(prefix: str, value: ast.AST, first_line: int) -> set[int]:
        """Records the keywords of ``dict(...)`` / ``ConfigDict(dict(...))``; the lines whose
        comments they took (not ``first_line``, whose comment is the section's)."""
        if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "ConfigDict" \
                and value.args:
            value = value.args[0]
        if not (isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "dict"):
            return set()
        taken: set[int] = set()
        said: dict[int, list[str]] = {}  # line -> the comment of its first keyword
        for kw in value.keywords:
            if kw.arg is None:
                continue
            inner = keywords(f"{prefix}.{kw.arg}", kw.value, kw.lineno)
            lines = set(range(kw.lineno, kw.end_lineno + 1)) - inner - taken - {first_line}
            if kw.lineno in lines:
                said[kw.lineno] = above(kw.lineno) + beside(lines)
            record(f"{prefix}.{kw.arg}", said[kw.lineno] if kw.lineno in said else beside(lines))
            taken |= lines | inner
        return taken

    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
            continue
        parts, target = [], node.targets[0]
        while isinstance(target, ast.Attribute):
            parts.insert(0, target.attr)
            target = target.value
        if not (isinstance(target, ast.Name) and target.id == "c" and parts):
            continue
        key = ".".join(parts)
        inner = keywords(key, node.value, node.lineno)
        record(key, above(node.lineno) + beside(set(range(node.lineno, node.end_lineno + 1)) - inner))
    return found


def experiment_help(name: str, args: list[str]) -> str:
    from ssah_jax.runs import get, leaves

    _, doc, presets = _describe(name)
    spec = _config_spec(args)
    if spec is None:
        default = CONFIGS / f"{name}.py"
        relative = os.path.relpath(default)
        spec = relative if not relative.startswith("..") else str(default)
    config = load_config(spec)
    path = spec.partition(":")[0]
    module = importlib.import_module(f"experiments.{name}")
    excluded = getattr(module, "EXCLUDED", None)
    lines = [f"ssah-jax {name}: {doc}", "",
             USAGE.replace("<experiment>", name, 1).replace("configs/<experiment>.py", f"configs/{name}.py"),
             f"presets: {_presets(presets)}", "", f"{path}: {plain(_module_parts(Path(path))[0])}", "",
             f"Config keys and values of --config={spec}{'' if ':' in spec else ' (its default preset)'}:"]
    comments, said, last = key_comments(Path(path)), set(), None
    for key in leaves(config):  # every key, in file order, after what its config file says of it and its sections
        parts = key.split(".")
        for about in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):
            if about in comments and about not in said:
                said.add(about)
                if comments[about] != last:  # the keywords of one line share its comment: once
                    lines += [f"  # {line}" for line in textwrap.wrap(comments[about], 96)]
                last = comments[about]
        lines.append(f"  {key} = {get(config, key)!r}")
    if excluded is None:
        lines += ["", "Each stage records the identity of what it is given; a re-run that changes it is refused."]
    elif excluded:
        subruns = getattr(module, "SUBRUNS", ())
        speed = [k for k in excluded if k not in subruns]
        lines += ["", "A re-run in a workdir is refused when it changes a key the results depend on: every key "
                  f"but {', '.join(speed)}, which only affect speed or logging"
                  + (f", and {', '.join(subruns)}, run in a directory of its own that checks its keys the same "
                     "way." if subruns else ".")]
    else:
        lines += ["", "A re-run in a workdir is refused when it changes any of these keys (each one determines "
                  "the results)."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Running


def _first_missing(path: Path) -> Path | None:
    """The outermost of ``path`` and its parents that does not exist (what mkdir would make)."""
    missing = None
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            break
        missing = p
    return missing


def _unknown_key(args: list[str], name: str, error: BaseException) -> str:
    """The message for an unknown ``--config.<key>``: names the key as given."""
    spec = _config_spec(args)
    keys = [a[len("--config."):].split("=", 1)[0] for a in args if a.startswith("--config.")]
    if spec is None and keys:  # an override needs the file whose value it overrides
        example = "configs/sweeps/<name>.py:<preset>" if name == "sweep" else f"configs/{name}.py"
        return f"--config.{keys[0]} overrides a config file's key: give the file too, e.g. --config={example}"
    config = None
    if spec is not None:
        try:
            config = load_config(spec)
        except Exception:  # the flag parser reports a config that does not load
            config = None

    def known(key: str) -> bool:
        target = config
        for part in key.split("."):
            if not isinstance(target, ConfigDict) or part not in target:
                return False
            target = target[part]
        return True

    unknown = [k for k in keys if config is not None and not known(k)]
    if not unknown:  # the parser's own words, without its quoting
        unknown = [str(error.args[0] if error.args else error).strip("'\"").removeprefix("Unknown command line flag ")
                   .strip("'\"").removeprefix("config.")]
    listing = f"ssah-jax sweep --config={spec} --help" if name == "sweep" else f"ssah-jax {name} --help"
    where = f" ({spec.partition(':')[0]} has no such key; `{listing}` lists them)" if spec else ""
    nearest = []
    if config is not None:
        from ssah_jax.runs import leaves

        every = list(leaves(config))
        parent, _, leaf = unknown[0].rpartition(".")  # its siblings first: a misspelt last part
        siblings = {k.rpartition(".")[2]: k for k in every if k.rpartition(".")[0] == parent}
        nearest = ([siblings[m] for m in difflib.get_close_matches(leaf, list(siblings), n=3, cutoff=0.7)]
                   or difflib.get_close_matches(unknown[0], every, n=3, cutoff=0.8))
    hint = f"; did you mean {' or '.join('config.' + k for k in nearest)}?" if nearest else ""
    return f"unknown config key {', '.join('config.' + k for k in unknown)}{where}{hint}"


def _bad_value(args: list[str], message: str) -> str | None:
    """The message for a ``--config.<key>=<value>`` the key's type does not take: names the key,
    the value and the type its config gives it; None for another flag error."""
    found = re.match(r"flag --config\.([\w.]+)=(.*?): ", message)
    spec = _config_spec(args)
    if not found or spec is None:
        return None
    key, value = found.groups()
    from ssah_jax.runs import get

    try:
        default = get(load_config(spec), key)
    except Exception:  # the config does not load, or has no such key: the parser's words
        return None
    kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        type(default), f"a {type(default).__name__}")
    return f"config.{key}={value}: expected {kind}, as its value in {spec.partition(':')[0]} ({default!r})"


def _parse_flags(argv: list[str]) -> list[str]:
    name = next((a for a in argv[1:] if not a.startswith("-")), "<experiment>")
    spec = _config_spec(argv[1:])
    try:
        if spec is not None and not Path(spec.partition(":")[0]).is_file():
            raise _Exit(f"--config={spec}: {spec.partition(':')[0]}: no such file")
        try:
            return flags.FLAGS(argv)
        except flags.UnrecognizedFlagError as e:
            if e.flagname.startswith("config."):
                raise _Exit(_unknown_key(argv[1:], name, e)) from None
            raise _Exit(f"unknown flag --{e.flagname} (`ssah-jax --help` lists the flags)") from None
        except SyntaxError as e:  # the config file itself
            raise _Exit(f"--config={spec}: {e.filename}:{e.lineno}: {e.msg}") from None
        except (AttributeError, KeyError) as e:  # ml_collections: an unknown --config.<key>
            if "get_config" in str(e):
                raise _Exit(f"--config={spec}: {spec.partition(':')[0]} defines no get_config(preset)") from None
            raise _Exit(_unknown_key(argv[1:], name, e)) from None
        except flags.Error as e:  # a config file that fails to load is reported with its traceback
            message = str(e)
            bad = _bad_value(argv[1:], message)
            if bad is not None:
                raise _Exit(bad) from None
            if "Traceback (most recent call last)" in message:  # its last line, without the exception's name
                last = re.sub(r"^[\w.]+(Error|Exception): ", "", message.strip().splitlines()[-1])
                message = f"--config={spec}: {last}"
            raise _Exit(message) from None
        except ValueError as e:  # the config file's get_config: an unknown preset
            raise _Exit(f"--config={spec}: {e}") from None
    except _Exit as e:
        _fail(str(e))


def split_lists(config: Any) -> None:
    """A list-valued key given as one comma-separated string (``--config.tasks=asr,prefill``
    parses as ``("asr,prefill",)``) becomes the list it names, in place; a Python literal
    (``"('asr', 'prefill')"``, ``"(5, 10)"``) already is one."""
    for key, value in config.items():
        if hasattr(value, "items"):
            split_lists(value)
        elif isinstance(value, tuple) and len(value) == 1 and isinstance(value[0], str) and "," in value[0]:
            config[key] = tuple(part.strip() for part in value[0].split(",") if part.strip())


def traceback_wanted() -> bool:
    """``--traceback`` or ``SSAH_TRACEBACK=1``: an expected error shows its traceback."""
    return _TRACEBACK.value or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def _fail(message: str) -> None:
    print("ssah-jax: " + _LINES.sub(" ", message).strip(), file=sys.stderr)
    sys.exit(2)


def _join_hosts() -> None:
    """``--multihost``: joins the run's other processes; their output but errors is silenced
    (process 0 reports)."""
    given = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if not _MULTIHOST.value and all(v is None for v in given):
        return
    from ssah_jax import hosts

    named = {"--coordinator_address": _COORDINATOR.value, "--num_processes": _NUM_PROCESSES.value,
             "--process_id": _PROCESS_ID.value}
    if any(v is not None for v in given) and any(v is None for v in given):
        _fail(f"--multihost: {', '.join(k for k, v in named.items() if v is None)} must be given too "
              "(all three, or none to detect the cluster)")
    if _NUM_PROCESSES.value is not None and not 0 <= _PROCESS_ID.value < _NUM_PROCESSES.value:
        _fail(f"--process_id={_PROCESS_ID.value}: must be in 0 .. {_NUM_PROCESSES.value - 1} (--num_processes)")
    try:
        hosts.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                         process_id=_PROCESS_ID.value)
    except (ValueError, RuntimeError) as e:  # no cluster to detect; the coordinator did not answer
        hint = "" if _COORDINATOR.value else (" (no Cloud TPU, SLURM, Open MPI or Kubernetes cluster detected: give "
                                              "--coordinator_address, --num_processes and --process_id)")
        _fail(f"--multihost: {str(e).rstrip('.')}{hint}")
    if not hosts.is_main():
        sys.stdout.flush()
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # also what the runtime prints
        logging.set_verbosity(logging.ERROR)


def _main(argv: list[str]) -> None:
    names = experiments()
    positional = argv[1:]
    if len(positional) != 1:
        _fail(f"give one experiment, got {positional or 'none'} (experiments: {', '.join(names)}); "
              "`ssah-jax --help` shows the usage")
    name = positional[0]
    if name not in names:
        _fail(f"unknown experiment {name!r} (experiments: {', '.join(names)})")
    _refuse_flags(PLAN_FLAGS, f"ssah-jax {name} (ssah-jax plan takes it)")
    if _CONFIG.value is None:
        presets = _describe(name)[2] or ["<preset>"]
        _fail(f"--config is required, e.g. --config=configs/{name}.py:{presets[0]}")
    if not _WORKDIR.value:
        _fail("--workdir is required")
    own = CONFIGS / f"{name}.py"
    if own.is_file():  # a config file of another experiment would fail on its first missing key
        missing = sorted(set(load_config(str(own)).keys()) - set(_CONFIG.value.keys()))
        if missing:
            _fail(f"--config={_config_spec(sys.argv[1:]) or ''}: not a {name} config (it lacks "
                  f"{', '.join('config.' + k for k in missing[:5])}{', ...' if len(missing) > 5 else ''}); "
                  f"use configs/{name}.py")
    split_lists(_CONFIG.value)
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint file operation at INFO
    _join_hosts()
    module = importlib.import_module(f"experiments.{name}")
    start = time.time()

    def run() -> None:
        from ssah_jax.runs import mark_finished

        module.run(_CONFIG.value, _WORKDIR.value, overwrite=_OVERWRITE.value)
        mark_finished(_WORKDIR.value, sys.argv, time.time() - start)

    _in_workdir(run, Path(_WORKDIR.value))


def _in_workdir(run: Any, workdir: Path) -> None:
    """``run()``, whose expected errors are one line (removing a workdir it made and left
    without results) and whose Ctrl-C says how to resume."""
    made = _first_missing(workdir)
    try:
        run()
    except KeyboardInterrupt:
        print(f"\nssah-jax: interrupted; the same command resumes in {workdir}", file=sys.stderr)
        sys.exit(130)
    except expected_errors() as e:
        from ssah_jax import hosts
        from ssah_jax.runs import holds_results

        if hosts.is_main() and made is not None and made.is_dir() and not holds_results(made):
            shutil.rmtree(made)  # made by this invocation, before it produced anything
        if traceback_wanted():
            raise
        _fail(one_line(e))


def experiment_of(spec: str, config: ConfigDict) -> str:
    """The experiment a config belongs to: its file's name, else the one with its keys."""
    stem = Path(spec.partition(":")[0]).stem
    if stem in experiments():
        return stem
    for name in experiments():
        own = CONFIGS / f"{name}.py"
        if own.is_file() and set(load_config(str(own)).keys()) == set(config.keys()):
            return name
    raise _Exit(f"--config={spec}: not the config of an experiment ({', '.join(experiments())})")


PLAN_FLAGS = ("devices", "memory_gb", "topology", "prompt_tokens")
RUN_FLAGS = ("workdir", "overwrite", "multihost", "coordinator_address", "num_processes", "process_id")


def _refuse_flags(names: tuple[str, ...], command: str) -> None:
    given = [f"--{n}" for n in names if flags.FLAGS[n].present]
    if given:
        _fail(f"{', '.join(given)}: not a flag of {command}")


def _plan_main(argv: list[str]) -> None:
    if argv[1:] != ["plan"]:
        _fail(f"ssah-jax plan takes no other arguments, got {argv[2:]}; {PLAN_USAGE}")
    _refuse_flags(RUN_FLAGS, "ssah-jax plan (it runs nothing)")
    if _CONFIG.value is None:
        _fail(f"--config is required; {PLAN_USAGE}")
    spec = _config_spec(sys.argv[1:]) or ""
    try:
        name = experiment_of(spec, _CONFIG.value)
    except _Exit as e:
        _fail(str(e))
    split_lists(_CONFIG.value)
    logging.set_verbosity(logging.ERROR)
    from ssah_jax import planning

    try:
        lines = planning.plan(name, _CONFIG.value, count=_DEVICES.value, memory_gb=_MEMORY_GB.value,
                              topology=_TOPOLOGY.value, prompt_tokens=_PROMPT_TOKENS.value)
    except expected_errors() as e:
        if traceback_wanted():
            raise
        _fail(one_line(e))
    print("\n".join(lines))


SWEEP_REFUSED = ("multihost", "coordinator_address", "num_processes", "process_id")


def sweep_config_help(spec: str) -> str:
    from ssah_jax.runs import get, leaves

    config = load_config(spec)
    path = spec.partition(":")[0]
    lines = [SWEEP_USAGE, "", f"{path}: {plain(_module_parts(Path(path))[0])}", "",
             f"presets: {_presets(_module_parts(Path(path))[1])}", "", f"Config keys and values of --config={spec}:"]
    return "\n".join(lines + [f"  {key} = {get(config, key)!r}" for key in leaves(config)])


def _sweep_main(argv: list[str]) -> None:
    if argv[1:] != ["sweep"]:
        _fail(f"ssah-jax sweep takes no other arguments, got {argv[2:]}; {SWEEP_USAGE}")
    _refuse_flags(PLAN_FLAGS, "ssah-jax sweep (ssah-jax plan takes it)")
    _refuse_flags(SWEEP_REFUSED, "ssah-jax sweep (a point that needs several hosts: config.executor=print "
                  "and scripts/launch_tpu_pod.sh)")
    if _CONFIG.value is None:
        _fail(f"--config is required, e.g. --config=configs/sweeps/fractions.py:tiny; {SWEEP_USAGE}")
    if not _WORKDIR.value:
        _fail("--workdir is required")
    split_lists(_CONFIG.value)
    logging.set_verbosity(logging.WARNING)
    from ssah_jax import sweeps

    _in_workdir(lambda: sweeps.run(_CONFIG.value, _WORKDIR.value, overwrite=_OVERWRITE.value, argv=sys.argv),
                Path(_WORKDIR.value))


DATA_HELP = """The data kit: every dataset the presets read, from its public source at a pinned revision.

  ssah-jax data list                     each dataset: its files, whether they are here, their licence
  ssah-jax data fetch [DATASET ...]      fetch what is missing or altered (all datasets without names)
  ssah-jax data check [DATASET ...]      check what is here against the recorded sizes and sha256

  --data_dir=DIR   the kit's directory (default: $SSAH_DATA_DIR, else ~/.cache/ssah_jax/data,
                   which is where the experiments look when their config's data_dir is empty)
  --mirror=URL     fetch from a copy of the kit's layout instead of the upstream sources
                   (file:///path/to/kit or https://host/kit)

Each file is checked against its recorded size and sha256 before it is written; the sources,
hashes and licences are in ssah_jax/data/manifest.json (written by scripts/data_manifest.py).
Exit status: 0 when every file asked for is intact, 1 when check finds one missing or altered,
2 for a bad argument or a failed download."""


def data_main(args: list[str]) -> None:
    """``ssah-jax data list|fetch|check [DATASET ...] [--data_dir=DIR] [--mirror=URL]``."""
    if not args or args[0] in HELP or any(a in HELP for a in args):
        print(DATA_HELP, file=sys.stdout if args else sys.stderr)
        sys.exit(0 if args else 2)
    action, flags, names = args[0], {"--data_dir": None, "--mirror": None}, []
    if action not in ("list", "fetch", "check"):
        _fail(f"data: unknown action {action!r} (list, fetch or check; `ssah-jax data --help`)")
    for arg in args[1:]:
        key, eq, value = arg.partition("=")
        if key in flags and eq and value:
            flags[key] = value
        elif arg.startswith("-"):
            _fail(f"data {action}: unknown flag {arg!r} (--data_dir=DIR, --mirror=URL)")
        else:
            names.append(arg)
    mirror = flags["--mirror"]
    from ssah_jax.data import DataError, registry
    from ssah_jax.data import fetch as datakit
    from ssah_jax.data.kit import resolve_data_dir

    root = resolve_data_dir(flags["--data_dir"])
    try:
        files = datakit.dataset_files(names)
        if action == "list":
            for name in names or sorted(registry.DATASETS):
                paths = datakit.dataset_files([name])
                missing = [p for p in paths if not (root / p).is_file()]
                licences = sorted({datakit.manifest()[p]["license"] for p in paths
                                   if "accompanies" not in datakit.manifest()[p]})
                state = "here" if not missing else f"{len(missing)} of {len(paths)} files missing"
                print(f"{name:27} {state:27} {'; '.join(licences)}")
            print(f"(in {root})")
            return
        if action == "check":
            if mirror:
                _fail("data check: --mirror is for fetch")
            problems = datakit.check(names, root)
            for path, why in problems.items():
                print(f"{root / path}: {why} (datasets: {', '.join(datakit.datasets_of(path)) or 'a licence'})")
            if problems:
                print(f"ssah-jax data check: {len(problems)} of {len(files)} files missing or altered in {root}; "
                      f"`ssah-jax data fetch{''.join(' ' + n for n in names)}` fetches them", file=sys.stderr)
                sys.exit(1)
            print(f"{len(files)} files intact in {root}")
            return
        done = datakit.fetch(names, root, mirror=mirror)
    except DataError as e:
        _fail(f"data {action}: {e}")
    for name in names or sorted(registry.DATASETS):  # a line per dataset: its licence and source
        paths = [p for p in datakit.dataset_files([name]) if "accompanies" not in datakit.manifest()[p]]
        entry = datakit.manifest()[paths[0]]
        source = entry["source"]
        if len(paths) > 1:  # the files' common folder upstream
            common = os.path.commonprefix([datakit.manifest()[p]["source"] for p in paths])
            source = f"{common.rsplit('/', 1)[0]}/ ({len(paths)} files)"
        print(f"{name}: {entry['license']}; from {source}")
    fetched = sum(how == "fetched" for how in done.values())
    print(f"{fetched} file{'' if fetched == 1 else 's'} fetched, {len(done) - fetched} already intact: {root}")


JUDGE_HELP = """usage: ssah-jax judge --rows=PATH [--rows=PATH ...] --judge=NAME [--judge_model=DIR] [--dtype=float32]
                      [--show]

Re-judges the answers evaluations wrote, without running their models. PATH is a rows file
(an evaluation's rows/<task>.jsonl) or a directory: every rows/<task>.jsonl under it (an
evaluation's workdir, or every evaluation of a reproduce / signals / sweep workdir). Each file's
rows go, re-judged, to rows.<judge>/<task>.jsonl beside rows/ (the originals are kept).

For each file it prints the answers, the rate as recorded and as re-judged (ASR; over-refusal
for overrefusal rows) and how many verdicts changed, which way, and by which rule of the keyword
judge; --show prints every changed answer. For a directory it also writes the table of every
file's rates, with 95% intervals, to <directory>/judged.<judge>.md.

Judges (ssah_jax.evaluation.judges): keyword (the mended keyword rules), keyword_v1 (the rules
of every report before the mending: it reproduces their recorded verdicts), harmbench and
llama_guard (a classifier: --judge_model=<its HF directory or hub id>, loaded in --dtype; an
accelerator for real use). How far each agrees with labelled answers: docs/results/judge.md.

Exit status: 0, or 2 for a bad argument or an unreadable rows file."""


def judge_main(args: list[str]) -> None:
    """``ssah-jax judge --rows=PATH ... --judge=NAME [--judge_model=DIR] [--dtype=...] [--show]``."""
    if not args or any(a in HELP for a in args):
        print(JUDGE_HELP, file=sys.stdout if args else sys.stderr)
        sys.exit(0 if args else 2)
    flags, rows, show = {"--judge": None, "--judge_model": "", "--dtype": "float32"}, [], False
    for arg in args:
        key, eq, value = arg.partition("=")
        if key == "--rows" and eq and value:
            rows.append(Path(value))
        elif key in flags and eq and value:
            flags[key] = value
        elif arg == "--show":
            show = True
        else:
            _fail(f"judge: unknown argument {arg!r} (--rows=PATH, --judge=NAME, --judge_model=DIR, --dtype=DTYPE, "
                  "--show; `ssah-jax judge --help`)")
    if not rows or not flags["--judge"]:
        _fail("judge: --rows=PATH and --judge=NAME are needed (`ssah-jax judge --help`)")
    if flags["--dtype"] not in ("float32", "bfloat16"):
        _fail(f"judge: --dtype={flags['--dtype']!r}: float32 or bfloat16")
    import jax.numpy as jnp

    from ssah_jax import runs
    from ssah_jax.evaluation import judges, rejudge

    try:
        files = rejudge.rows_files(rows)
        judge = judges.load_judge(flags["--judge"], flags["--judge_model"], dtype=jnp.dtype(flags["--dtype"]),
                                  prefix="--")
        done = []
        for path in files:
            judged = rejudge.rejudge_file(path, judge)
            done.append(judged)
            print(judged.summary())
            if show:
                for i in judged.changed:
                    row = judged.rows[i]
                    print(f"  [{judged.rules[i]}] {'yes' if judged.before[i] else 'no'} -> "
                          f"{'yes' if judged.after[i] else 'no'}: {row['prompt'][:70]!r} -> "
                          f"{(row.get('prefix') or '') + row['answer']!r}")
    except (ValueError, runs.ConfigError) as e:
        _fail(f"judge: {one_line(e)}")
    print(f"Re-judged rows: {', '.join(sorted({str(j.written.parent) for j in done}))}")
    directories = [p for p in rows if p.is_dir()]
    if directories:
        root = directories[0] if len(rows) == 1 else None
        report = (root if root is not None else Path(".")) / f"judged.{judge.name}.md"
        report.write_text(f"# {len(done)} rows files re-judged by `{judge.name}`\n\n"
                          + rejudge.table(done, root, judge.name) + "\n")
        print(f"Report: {report}")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if os.environ.get("SSAH_SWEEP_PARENT"):  # sweeps.PARENT_ENV: a point of a sweep ends with the sweep
        from ssah_jax.sweeps import follow_parent

        follow_parent()
    args = argv[1:]
    names = experiments()
    first = args[0] if args else None
    if first is None:
        print(overview(), file=sys.stderr)
        sys.exit(2)
    if first in HELP or first == "help":
        print(overview())
        sys.exit(0)
    if first == "sweep":
        if any(a in HELP for a in args):
            spec = _config_spec(args)
            if spec is None:
                print(sweep_help())
            else:
                try:
                    print(sweep_config_help(spec))
                except _Exit as e:
                    _fail(str(e))
            sys.exit(0)
        app.run(_sweep_main, argv=argv, flags_parser=_parse_flags)
        return
    if first == "data":
        data_main(args[1:])
        return
    if first == "judge":
        judge_main(args[1:])
        return
    if first == "plan":
        if any(a in HELP for a in args):
            print(PLAN_HELP)
            sys.exit(0)
        app.run(_plan_main, argv=argv, flags_parser=_parse_flags)
        return
    if not first.startswith("-") and first not in names:
        _fail(f"unknown experiment {first!r} (experiments: {', '.join(names)}; commands: plan, sweep, data, judge)")
    if any(a in HELP for a in args):
        if first.startswith("-"):
            print(overview())
        else:
            try:
                print(experiment_help(first, args))
            except _Exit as e:
                _fail(str(e))
        sys.exit(0)
    app.run(_main, argv=argv, flags_parser=_parse_flags)


if __name__ == "__main__":
    main()
