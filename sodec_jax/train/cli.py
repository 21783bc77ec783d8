"""The command line: python -m sodec_jax.train --config FILE --workdir DIR [--config.a.b=v ...]
[--print_config].

The config file is executed once (`load_config_file`); its overrides are then applied by
ml_collections' config flags on the loaded ConfigDict. Usage problems (a missing flag, an
exception inside the config file, an unknown or ill-typed override) are one line on stderr and
exit code 2; `--print_config` prints the resolved config (and, for a pipeline, each stage's as
training would run it) to stdout and exits 0 without training.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import traceback

import ml_collections
from absl import flags
from ml_collections import config_flags

from sodec_jax.errors import SodecError
from sodec_jax.train.loop import Preempted, train
from sodec_jax.train.pipeline import stage_configs


class UsageError(Exception):
  """A command-line problem; its message is the one line printed after 'error: '."""


def _config_arg(argv) -> tuple[str | None, list[str]]:
  """(the --config value, argv without it): --config PATH or --config=PATH."""
  rest, path, skip = [], None, False
  for i, a in enumerate(argv):
    if skip:
      skip = False
    elif a == "--config" and i + 1 < len(argv):
      path, skip = argv[i + 1], True
    elif a.startswith("--config="):
      path = a.split("=", 1)[1]
    else:
      rest.append(a)
  return path, rest


def _where(err: BaseException, path: str) -> str:
  """'FILE:LINE' of the deepest traceback frame inside the config file's folder (the file
  itself or a config it imports, e.g. configs/base.py); `path` alone when none is."""
  if isinstance(err, SyntaxError) and err.filename and err.lineno:
    return f"{_shown(err.filename, path)}:{err.lineno}"
  folder = os.path.dirname(os.path.abspath(path))
  frames = [
    f
    for f in traceback.extract_tb(err.__traceback__)
    if os.path.dirname(os.path.abspath(f.filename)) == folder
  ]
  return f"{_shown(frames[-1].filename, path)}:{frames[-1].lineno}" if frames else path


def _shown(filename: str, path: str) -> str:
  """`filename` as the user named it: `path` itself, else relative to the current folder."""
  if os.path.abspath(filename) == os.path.abspath(path):
    return path
  rel = os.path.relpath(filename)
  return filename if rel.startswith("..") else rel


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Executes a config file once -> its get_config() (get_config(ARG) for FILE:ARG).

  An exception raised while running the file -> UsageError 'FILE:LINE: Type: message'.
  """
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise UsageError(f"--config {spec}: no such file")
  # Config files import `configs.base`: make the directory holding configs/ importable.
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:
    sys.path.insert(0, root)
  try:
    module_spec = importlib.util.spec_from_file_location("_sodec_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
      raise UsageError(f"--config {path} has no get_config() function")
    config = module.get_config(arg) if arg else module.get_config()
  except UsageError:
    raise
  except Exception as err:  # pylint: disable=broad-except
    message = err.msg if isinstance(err, SyntaxError) else str(err)
    raise UsageError(
      f"{_where(err, path)}: {type(err).__name__}: {message}".splitlines()[0]
    ) from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise UsageError(
      f"--config {path}: get_config() returned {type(config).__name__}, "
      "not an ml_collections.ConfigDict"
    )
  return config


def unknown_override(argv, config: ml_collections.ConfigDict) -> str | None:
  """The message for the first --config.a.b override naming a field `config` lacks, listing
  the fields of its parent; None when every override names a field."""
  for a in argv:
    if not a.startswith("--config."):
      continue
    name = a[len("--config.") :].split("=", 1)[0]
    node = config
    for i, part in enumerate(name.split(".")):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        parent = ".".join(name.split(".")[:i])
        fields = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        return f"unknown config field '{name}' in {a}" + (
          f" (fields of {parent or 'config'}: {', '.join(fields)})" if fields else ""
        )
      node = node[part]
  return None


def parse_flags(argv) -> tuple[ml_collections.ConfigDict, str | None, bool]:
  """argv -> (the config with its overrides, --workdir, --print_config); UsageError otherwise."""
  spec, rest = _config_arg(list(argv))
  if spec is None:
    raise UsageError("--config is required, e.g. --config configs/stage1.py")
  config = load_config_file(spec)
  message = unknown_override(rest, config)
  if message:
    raise UsageError(message)
  fv = flags.FlagValues()
  config_flags.DEFINE_config_dict(
    "config",
    config,
    "Experiment config (configs/*.py); override fields with --config.a.b=v.",
    flag_values=fv,
    lock_config=True,
    sys_argv=rest,
  )
  flags.DEFINE_string(
    "workdir", None, "Training directory: config, checkpoints, metrics (resumes).", flag_values=fv
  )
  flags.DEFINE_boolean(
    "print_config",
    False,
    "Print the resolved config (each pipeline stage's too) and exit without training.",
    flag_values=fv,
  )
  try:
    fv(rest)
  except flags.Error as err:
    raise UsageError(str(err).splitlines()[0]) from None
  if not fv.print_config and not fv.workdir:
    raise UsageError("--workdir is required: the directory for config, checkpoints and metrics")
  return fv.config, fv.workdir, fv.print_config


def print_config(config: ml_collections.ConfigDict) -> None:
  """Prints `config` and, for a pipeline, each stage's config as train() runs it (stage_config;
  init_from, set per workdir when the pipeline runs, aside)."""
  print(f"# config\n{config}", end="")
  if config.get("pipeline") and config.pipeline.stages:
    stages = stage_configs(config)
    for i, (name, c) in enumerate(stages):
      print(f"# pipeline stage {i + 1}/{len(stages)}: {name}\n{c}", end="")


def main(argv=None) -> int:
  """The command line's exit code: 2 for a usage problem, else run()'s."""
  argv = list(sys.argv if argv is None else argv)
  try:
    config, workdir, show = parse_flags(argv)
    if show:
      print_config(config)
      return 0
  except (UsageError, SodecError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  return run(config, workdir)


def run(config, workdir: str) -> int:
  """train() with the command line's exit codes: 0 done or preempted (SIGTERM, checkpoint
  saved), 1 a SodecError, 130 Ctrl-C; messages go to stderr."""
  try:
    train(config, workdir)
  except SodecError as err:
    print(f"error: {err}", file=sys.stderr)
    return 1
  except Preempted as err:
    print(str(err), file=sys.stderr)
    return 0
  except KeyboardInterrupt:
    print(
      f"\ninterrupted; rerun the same command to resume from the last checkpoint in {workdir}",
      file=sys.stderr,
    )
    return 130
  return 0
