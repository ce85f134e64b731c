"""The way in of a training config: `load_config` (defaults < YAML file or preset < Python overrides < `--key value`
flags), `config_help` (`diffalign train <algorithm> --help`) and `preset_path`.

Imports neither torch nor diffusers, so `--help` and configuration errors come back at once. Unknown keys, values of
the wrong type and impossible batch arithmetic raise `ConfigError` with one line naming the problem.
"""

import argparse
import dataclasses
import os
import types
import typing
from importlib import resources
from typing import Any, Dict, List, Optional, Union

import yaml

from .._hf_argparser import HfArgumentParser, string_to_bool
from ..errors import ConfigError, did_you_mean
from ..trainers import CONFIG_CLASSES
from ..trainers.base_config import default_output_dir, run_dir_of


def preset_path(name_or_path: str) -> str:
    """A YAML path, or the name of a preset shipped in `diffalign.configs` (with or without `.yaml`)."""
    if os.path.isfile(name_or_path):
        return name_or_path
    name = name_or_path if name_or_path.endswith(".yaml") else name_or_path + ".yaml"
    candidate = resources.files("diffalign.configs").joinpath(name)
    if candidate.is_file():
        return str(candidate)
    presets = sorted(p.name[:-5] for p in resources.files("diffalign.configs").iterdir() if p.name.endswith(".yaml"))
    hint = did_you_mean(os.path.basename(name_or_path)[:-5] if name_or_path.endswith(".yaml") else name_or_path,
                        presets)
    raise ConfigError(f"config '{name_or_path}' is neither a file nor a preset{hint} (presets: {', '.join(presets)})")


# ------------------------------------------------------------------------------------------------ parsing (TrlParser)
# `load_config` is TRL's `TrlParser` pattern on transformers' `HfArgumentParser` (vendored as TRL does it, in
# `diffalign/_hf_argparser.py`): the YAML file (or preset) and Python overrides become the parser's defaults, then the
# command line is parsed over them into the config dataclass. Its argparse options come from the dataclass fields alone
# (names, both spellings, `help` metadata, defaults), so fields added to the config classes need nothing here.
# `ConfigParser` adapts what HfArgumentParser does not do, each for a reason given where it is done: one-line
# `ConfigError`s instead of argparse's usage-and-exit, YAML values on the command line, and type checks of the YAML and
# Python values (argparse converts strings only).

_YAML_NULLS = frozenset({"null", "Null", "NULL", "~"})


def _members(tp) -> tuple:
    """The members of a Union other than None (`Optional[X]` -> `(X,)`), else `(tp,)`."""
    if typing.get_origin(tp) in (Union, getattr(types, "UnionType", Union)):
        return tuple(a for a in typing.get_args(tp) if a is not type(None))
    return (tp,)


def _allows_none(tp) -> bool:
    return typing.get_origin(tp) in (Union, getattr(types, "UnionType", Union)) and type(None) in typing.get_args(tp)


_KINDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
          dict: "a mapping"}


def _kind(tp):
    """`str`, `int`, `float`, `bool`, `list`, `dict` or `Any` for an annotation this parser checks, else None."""
    if tp is Any:
        return Any
    origin = typing.get_origin(tp) or tp
    return origin if origin in _KINDS else None


def _check(name: str, value, tp):
    """`value` (from YAML or Python) as annotated by `tp`, ints widened to floats, or a one-line `ConfigError`.

    HfArgumentParser takes the values it is given as defaults (a YAML file's) as they are unless they are strings, as
    argparse does: this check is what makes `num_epochs: 2.5` in a file an error rather than a crash later.
    """
    if value is None and (_allows_none(tp) or tp is Any):
        return None
    members = _members(tp)
    if len(members) > 1:
        for member in members:
            try:
                return _check(name, value, member)
            except ConfigError:
                pass
        kinds = " or ".join(dict.fromkeys(_KINDS.get(_kind(m), _type_name(m)) for m in members))
        raise ConfigError(f"{name}: expected {kinds}, got {value!r}")
    (tp,) = members
    kind = _kind(tp)
    if kind is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(tp) or (Any,)
        return [_check(name, item, item_type) for item in value]
    if kind is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if kind in (bool, int, float, str):
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            return value
        raise ConfigError(f"{name}: expected {_KINDS[kind]}, got {value!r}")
    return value


def _from_text(name: str, text: str, tp):
    """A command-line string as a value of `tp`: numbers and booleans as written (transformers' `string_to_bool`,
    plus on/off), lists and mappings as YAML flow (`[a, b]`, `{pickscore: 10}`), a YAML null for an optional field.

    A field taking a string or something else (`reward`: a name or a mixture) tries the other types first and keeps
    the text otherwise, so a name is never re-read as YAML (`no`, `hpsv2.1` stay strings).
    """
    if text in _YAML_NULLS and _allows_none(tp):
        return None
    members = sorted(_members(tp), key=lambda m: m is str)  # str last: the fallback
    problems = []
    for member in members:
        kind = _kind(member)
        if kind is str:
            return text
        try:
            if kind is bool:
                if text.lower() in ("on", "off"):
                    return text.lower() == "on"
                try:
                    return string_to_bool(text)
                except argparse.ArgumentTypeError:
                    raise ConfigError(f"{name}: expected true or false, got {text!r}") from None
            if kind is int:
                try:
                    return int(text)
                except ValueError:
                    raise ConfigError(f"{name}: expected an integer, got {text!r}") from None
            if kind is float:
                try:
                    return float(text)
                except ValueError:
                    raise ConfigError(f"{name}: expected a number, got {text!r}") from None
            return _check(name, _parse_cli_value(text), member)
        except ConfigError as e:
            problems.append(e)
    if len(problems) == 1:
        raise problems[0]
    raise ConfigError(f"{name}: expected {' or '.join(_KINDS.get(_kind(m), _type_name(m)) for m in members)}, "
                      f"got {text!r}")


class _CliType:
    """The argparse `type=` of a field: `_from_text`, its `ConfigError` as argparse's `ArgumentTypeError`."""

    def __init__(self, name: str, tp):
        self.name, self.tp = name, tp
        self.__name__ = _type_name(tp)  # argparse names the type in some messages

    def __call__(self, text: str):
        try:
            return _from_text(self.name, text, self.tp)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None


def _metavar(tp) -> str:
    kinds = [_kind(m) for m in _members(tp)]
    if None in kinds:
        return None
    names = {str: "STR", int: "INT", float: "FLOAT", bool: "BOOL", list: "LIST", dict: "MAPPING", Any: "YAML"}
    return "|".join(dict.fromkeys(names[k] for k in kinds))


def _config_parser(cls):
    """An `HfArgumentParser` of the config class `cls`."""
    import copy
    import re

    class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
        """argparse's help with defaults, one spelling per key (the description says both work)."""

        def __init__(self, prog):
            super().__init__(prog, max_help_position=36)

        def _format_action_invocation(self, action):
            if not action.option_strings or action.nargs == 0:
                return super()._format_action_invocation(action)
            metavar = self._format_args(action, self._get_default_metavar_for_optional(action))
            return f"{action.option_strings[0]} {metavar}"

    class ConfigParser(HfArgumentParser):
        """HfArgumentParser of one config class, with these adaptations:

        - errors raise a one-line `ConfigError` (the CLI prints it, exit code 2) instead of printing the usage and
          exiting: `error()` raises and `exit_on_error=False` lets `argparse.ArgumentError` through to `parse`;
        - every field takes one value, read as its annotation says (`_from_text`): lists and mappings as YAML flow,
          `--prompts '[a cat, a dog]'` (HfArgumentParser's `nargs="+"` would make `--prompts notalist` a list and
          `--reward '{pickscore: 10}'` is no type it can call); `Union[str, Dict]` fields, which it narrows to one
          type, get both;
        - a boolean, `Optional[bool]` too, may stand alone (`--use_lora`); its `--no_<name>` stays out of `--help`;
        - no abbreviations (`--sample_num_step` is a typo to report with a suggestion, not `--sample_num_steps`);
        - `-1e-4` and `-inf` are values, not options (argparse knows only `-1` and `-.5`);
        - the dataclass's fields are left as they are (HfArgumentParser narrows `field.type` in place).
        """

        def __init__(self):
            self.hints = typing.get_type_hints(cls)
            super().__init__(cls, prog=f"diffalign train {cls.algorithm}", add_help=False, allow_abbrev=False,
                             exit_on_error=False, formatter_class=HelpFormatter)
            self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-inf(inity)?$",
                                                       re.IGNORECASE)

        def _parse_dataclass_field(self, parser, field):
            start = len(parser._actions)
            try:
                HfArgumentParser._parse_dataclass_field(parser, copy.copy(field))
            except (ValueError, TypeError):  # a Union it refuses (not Optional[X], no str): one value, read by type
                default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
                spellings = dict.fromkeys([f"--{field.name}", f"--{field.name.replace('_', '-')}"])
                parser.add_argument(*spellings, default=default, help=field.metadata.get("help"))
            hint = self.hints[field.name]
            for action in parser._actions[start:]:
                if isinstance(action, argparse._StoreFalseAction):  # `--no_<name>`: works, not listed
                    action.help = argparse.SUPPRESS
                    continue
                action.help = (action.help or "").replace("%", "%%")
                if action.choices is not None or any(_kind(m) is None for m in _members(hint)):
                    continue  # Literal / Enum choices, or a type this parser does not know: HfArgumentParser's own
                action.type = _CliType(field.name, hint)
                action.metavar = _metavar(hint)
                if any(_kind(m) is bool for m in _members(hint)):
                    action.nargs, action.const = "?", True
                elif action.nargs == "+":
                    action.nargs = None

        def error(self, message):
            raise ConfigError(message)

        def set_defaults_with_config(self, values: dict):
            """TrlParser's: the YAML (and override) values become the options' defaults, under the command line."""
            for action in self._actions:
                if action.dest in values:
                    action.default = values[action.dest]
                    action.required = False

        def parse(self, args: List[str]):
            """`(config, unparsed strings)`; argparse's errors as one-line `ConfigError`s."""
            try:
                *parsed, rest = self.parse_args_into_dataclasses(args=args, return_remaining_strings=True,
                                                                 look_for_args_file=False)
            except argparse.ArgumentError as e:
                option = (e.argument_name or "").split("/")[0]
                dest = option.lstrip("-").replace("-", "_")
                if e.message.startswith("expected "):  # "expected one argument": a value-less `--key` before `--x`
                    raise ConfigError(f"option '{option}' needs a value") from None
                if e.message.startswith(f"{dest}:"):  # a `_from_text` ConfigError
                    raise ConfigError(e.message) from None
                raise ConfigError(f"{option}: {e.message}") from None
            return parsed[0], rest

    return ConfigParser()


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _parse_cli_value(text: str):
    # CLI values are YAML scalars/flows: `3e-4`, `true`, `[a, b]`, `{pickscore: 10}`.
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _yaml_error_place(error) -> str:
    """` at line L, column C: <problem>` of a YAML syntax error (PyYAML's marks count from 0)."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None) or (str(error).splitlines() or [type(error).__name__])[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{where}: {problem}"


def load_config(algorithm: str, config: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None,
                cli_overrides: Optional[List[str]] = None):
    """Builds the config of `algorithm` from defaults, an optional YAML file/preset and overrides.

    Args:
        algorithm (`str`): a registered algorithm (`diffalign.trainers.CONFIG_CLASSES`): `ddpo` or `prdp`.
        config (`str`, *optional*): YAML path or preset name.
        overrides (`dict`, *optional*): already-typed values (highest precedence after `cli_overrides`).
        cli_overrides (`List[str]`, *optional*): `["--key", "value", ...]` from the command line (both spellings,
            `--key=value`, a boolean `--key` alone).

    `output_dir`, unless a flag or `overrides` give it: resuming, the run directory of `resume_from`; else the file's,
    or `runs/<preset or file name>` (`runs/<algorithm>` without one).
    """
    if algorithm not in CONFIG_CLASSES:
        raise ConfigError(f"unknown algorithm '{algorithm}'; choose from {', '.join(CONFIG_CLASSES)}")
    cls = CONFIG_CLASSES[algorithm]
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    values: Dict[str, Any] = {}

    if config:
        path = preset_path(config)
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML{_yaml_error_place(e)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys")
        declared = data.pop("algorithm", algorithm)
        if declared != algorithm:
            raise ConfigError(f"{path} is a '{declared}' config, not '{algorithm}'")
        for key, value in data.items():
            if key not in known:
                raise ConfigError(f"unknown config key '{key}' in {path}{did_you_mean(str(key), known)}")
            values[key] = value

    for key, value in (overrides or {}).items():
        if key not in known:
            raise ConfigError(f"unknown config key '{key}'{did_you_mean(str(key), known)}")
        values[key] = value

    parser = _config_parser(cls)
    parser.set_defaults_with_config(values)
    result, rest = parser.parse(list(cli_overrides or []))
    if rest:
        flag = rest[0]
        if not flag.startswith("--"):
            raise ConfigError(f"unexpected argument '{flag}' (options look like --key value)")
        key = flag[2:].partition("=")[0].replace("-", "_")
        raise ConfigError(f"unknown option '--{key}' for {algorithm}{did_you_mean(key, known, '--')}")
    for key in values:  # file and Python values: argparse converted the strings among them, not the rest
        setattr(result, key, _check(key, getattr(result, key), hints[key]))
    explicit_output = "output_dir" in (overrides or {}) or any(
        arg.partition("=")[0] in ("--output_dir", "--output-dir") for arg in cli_overrides or [])
    if result.resume_from and not explicit_output:
        result.output_dir = run_dir_of(result.resume_from)
    elif not explicit_output and values.get("output_dir") is None:
        result.output_dir = default_output_dir(config or algorithm)
    return result


def config_help(algorithm: str) -> str:
    """`--help` of `diffalign train <algorithm>`: every config key with its type, meaning and default (argparse's help
    of the HfArgumentParser)."""
    parser = _config_parser(CONFIG_CLASSES[algorithm])
    parser.usage = (f"diffalign train {algorithm} [--config FILE_OR_PRESET] [--resume RUN_OR_CHECKPOINT] "
                    f"[--accelerate-config NAME] [--key value ...]")
    parser.description = ("Config keys, in a YAML file (--config) or as --key value (both spellings; lists and "
                          "mappings as YAML, e.g. --prompts '[a cat, a dog]' --reward '{pickscore: 10}'; a boolean "
                          "--key alone is true, --no_key false). Flags override the file.")
    return parser.format_help().rstrip()
