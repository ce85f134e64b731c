"""`diffalign` command line: `train ddpo|prdp`, `generate`, `bench`, `env`.

Multi-GPU (or multi-process CPU) training goes through accelerate:
`accelerate launch -m diffalign.cli train prdp --config digits-prdp`.

Arguments are parsed and checked before any heavy library loads: building the parser and the config parser
(`diffalign.cli.parser`) import neither torch nor diffusers, so `--help` and configuration errors come back at once;
each command imports what it needs when it runs (`diffalign.cli.train` for `train`). Options take both spellings,
`--snake_case` and `--kebab-case`, in every command.
"""

import argparse
import importlib
import sys
from typing import List, Optional

from diffalign.cli.train import stop_with_launcher, train_command  # noqa: F401 (stop_with_launcher: public)
from diffalign.utils.logging_utils import quiet_libraries, setup_logging


def _user_errors():
    """Exception types that mean bad input (one line, exit code 2) rather than a bug: `diffalign.errors.UserError`,
    the base class of every such error (ConfigError, PromptError, CheckpointError, RewardError, ...)."""
    from diffalign.errors import UserError

    return (UserError,)


def _one_line(error: BaseException) -> str:
    from diffalign.utils.redaction import scrub

    text = " ".join(line.strip() for line in scrub(str(error)).splitlines() if line.strip())  # no secret in errors
    return text or type(error).__name__


def env_command(args, extra) -> int:
    import platform

    import torch

    print(f"python {platform.python_version()} on {platform.platform()}")
    for name in ("diffalign", "torch", "diffusers", "transformers", "accelerate", "peft", "safetensors"):
        try:
            module = __import__(name)
            print(f"{name} {getattr(module, '__version__', '?')}")
        except ImportError:
            print(f"{name} not installed")
    print(f"cuda available: {torch.cuda.is_available()}")
    for extra_name in ("xformers", "open_clip"):
        try:
            __import__(extra_name)
            print(f"{extra_name}: installed")
        except Exception:
            print(f"{extra_name}: not installed")
    return 0


def _run_module(module, args) -> int:
    if module.__name__ == "diffalign.bench":  # `generate` checks its arguments first, then quiets them itself
        quiet_libraries()
    return module.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffalign", description="Align text-to-image diffusion models with rewards and steer them at inference."
    )
    from diffalign import __version__

    parser.add_argument("--version", action="version", version=f"diffalign {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    from diffalign.trainers import CONFIG_CLASSES

    train = sub.add_parser("train", help=f"fine-tune with a reward ({', '.join(CONFIG_CLASSES)})", add_help=False)

    train.add_argument("algorithm", choices=list(CONFIG_CLASSES), nargs="?")
    train.add_argument("--config", default=None, help="YAML file or preset name (see diffalign/configs)")
    train.add_argument("--resume", default=None, help="run directory or checkpoint to resume")
    train.add_argument("--accelerate-config", default=None, metavar="NAME",
                       help="run under `accelerate launch` with a shipped config: multi_gpu, fsdp, zero2, zero3, "
                            "multi_node (or a config file); see diffalign.accelerate_configs")
    train.add_argument("-h", "--help", action="store_true")
    train.set_defaults(func=train_command, allow_extra=True, train_parser=train)

    for name, help_text in (("generate", "sample with RLG at several alignment strengths"),
                            ("bench", "benchmarks: rollout, train, learn, rlg")):
        # Each of these modules defines `add_arguments(parser)` and `run(args) -> int`, and imports no heavy library
        # at module level (run() does).
        command = sub.add_parser(name, help=help_text)
        module = importlib.import_module(f"diffalign.{name}")
        module.add_arguments(command)
        command.set_defaults(func=lambda args, extra, module=module: _run_module(module, args), allow_extra=False)

    env = sub.add_parser("env", help="print versions and devices")
    env.set_defaults(func=env_command, allow_extra=False)
    return parser


def normalize_flags(argv: List[str]) -> List[str]:
    """`--snake_case` options as `--kebab-case` for the argparse commands (`generate`, `bench`); `train` reads both
    spellings of its config keys itself. Values, and everything after `--`, are left alone."""
    out = list(argv)
    command = next((i for i, a in enumerate(out) if not a.startswith("-")), None)
    if command is None or out[command] not in ("generate", "bench"):
        return out
    for i in range(command + 1, len(out)):
        if out[i] == "--":
            break
        flag, eq, value = out[i].partition("=")
        if flag.startswith("--") and "_" in flag:
            out[i] = flag.replace("_", "-") + eq + value
    return out


def _option_strings(parser: argparse.ArgumentParser) -> List[str]:
    """Every `--option` of `parser` and of its sub-commands (for "did you mean")."""
    options = []
    for action in parser._actions:
        options += [o for o in action.option_strings if o.startswith("--")]
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                options += _option_strings(child)
    return sorted(set(options))


def main(argv: Optional[List[str]] = None) -> int:
    setup_logging()
    parser = build_parser()
    argv = normalize_flags(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "allow_extra", False):
        from diffalign.errors import did_you_mean

        command = parser._subparsers._group_actions[0].choices[args.command]
        hint = did_you_mean(extra[0].partition("=")[0].lstrip("-"), [o[2:] for o in _option_strings(command)], "--")
        command.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    try:
        return args.func(args, extra)
    except _user_errors() as e:
        print(f"diffalign: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        from diffalign.errors import is_disk_error

        if not is_disk_error(e):
            raise
        # a full disk, a read-only or forbidden output location: the OS' message and the path, not a traceback
        where = f": '{e.filename}'" if isinstance(e, OSError) and e.filename else ""
        detail = e.strerror if isinstance(e, OSError) and e.strerror else _one_line(e)
        print(f"diffalign: error: cannot write output: {detail}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffalign: interrupted", file=sys.stderr)
        return 130
