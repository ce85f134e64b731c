"""`diffalign` command line: `train ddpo|prdp`, `generate`, `bench`, `env`.

Multi-GPU (or multi-process CPU) training goes through accelerate:
`accelerate launch -m diffalign.cli train prdp --config digits-prdp`.

Arguments are parsed and checked before any heavy library loads: building the parser and `diffalign.config` import
neither torch nor diffusers, so `--help` and configuration errors come back at once; each command imports what it
needs when it runs. Options take both spellings, `--snake_case` and `--kebab-case`, in every command.
"""

import argparse
import importlib
import os
import sys
from typing import List, Optional

from diffalign.utils.logging_utils import quiet_libraries, setup_logging
from diffalign.utils.process_utils import launched_processes


def _user_errors():
    """Exception types that mean bad input (one line, exit code 2) rather than a bug: `diffalign.errors.UserError`,
    the base class of every such error (ConfigError, PromptError, CheckpointError, RewardError, ...)."""
    from diffalign.errors import UserError

    return (UserError,)


def _one_line(error: BaseException) -> str:
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text or type(error).__name__


def _default_output_dir(algorithm: str, config_name: Optional[str]) -> str:
    name = os.path.splitext(os.path.basename(config_name))[0] if config_name else algorithm
    return os.path.join("runs", name)


def _run_dir_of(resume: str) -> str:
    """The run directory of `--resume PATH` (PATH may be a checkpoint inside `<run>/checkpoints/`)."""
    path = os.path.abspath(resume)
    if os.path.basename(os.path.dirname(path)) == "checkpoints":
        return os.path.dirname(os.path.dirname(path))
    return path


def train_command(args, extra: List[str]) -> int:
    from diffalign.config import config_help, load_config

    if args.help:
        print(config_help(args.algorithm))
        return 0
    overrides = {}
    if args.resume:
        overrides["resume_from"] = args.resume
    config = load_config(args.algorithm, args.config, overrides, extra)
    if args.accelerate_config:  # the same command under `accelerate launch` with a shipped config
        from diffalign.accelerate_configs import launch

        again = ["--config", args.config] if args.config else []
        again += ["--resume", args.resume] if args.resume else []
        return launch(args.accelerate_config, ["train", args.algorithm] + again + list(extra))
    explicit_output = any(a.split("=")[0] in ("--output_dir", "--output-dir") for a in extra)
    if config.resume_from and not explicit_output:
        config.output_dir = _run_dir_of(config.resume_from)
    elif not explicit_output and (not args.config or "output_dir" not in _yaml_keys(args.config)):
        config.output_dir = _default_output_dir(args.algorithm, args.config)
    # every check that needs no model before the heavy imports: values, batch arithmetic, then the model location
    config.validate(launched_processes())
    from diffalign.utils.hub_utils import resolve_model_path

    resolve_model_path(config.model)
    quiet_libraries()
    from diffalign.config import trainer_class

    trainer_cls = trainer_class(args.algorithm)
    trainer = trainer_cls(config)
    history = trainer.train()
    if trainer.accelerator.is_main_process and history:
        first, last = history[0], history[-1]
        print(f"reward {first['reward_mean']:.4f} -> {last['reward_mean']:.4f} over {len(history)} epochs; "
              f"outputs in {config.output_dir}")
    return 0


def _yaml_keys(config: str) -> set:
    import yaml

    from diffalign.config import preset_path

    with open(preset_path(config)) as f:
        data = yaml.safe_load(f) or {}
    return set(data) if isinstance(data, dict) else set()


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
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fine-tune with a reward (ddpo or prdp)", add_help=False)
    from diffalign.config import CONFIG_CLASSES

    train.add_argument("algorithm", choices=list(CONFIG_CLASSES))
    train.add_argument("--config", default=None, help="YAML file or preset name (see diffalign/configs)")
    train.add_argument("--resume", default=None, help="run directory or checkpoint to resume")
    train.add_argument("--accelerate-config", default=None, metavar="NAME",
                       help="run under `accelerate launch` with a shipped config: multi_gpu, fsdp, zero2, zero3, "
                            "multi_node (or a config file); see diffalign.accelerate_configs")
    train.add_argument("-h", "--help", action="store_true")
    train.set_defaults(func=train_command, allow_extra=True)

    for name, help_text in (("generate", "sample with RLG at several alignment strengths"),
                            ("bench", "benchmarks: rollout, train, learn, rlg, tradeoff")):
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


if __name__ == "__main__":
    sys.exit(main())
