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
    from diffalign.utils.redaction import scrub

    text = " ".join(line.strip() for line in scrub(str(error)).splitlines() if line.strip())  # no secret in errors
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


def stop_with_launcher(poll_seconds: float = 1.0):
    """In a worker of `accelerate launch` / torchrun: a daemon thread that ends this process when its launcher is
    gone (killed alone, the launcher would leave its workers training to the end). The launcher is the parent
    process; when it dies the worker is re-parented, so `os.getppid()` changes."""
    import threading

    if "LOCAL_RANK" not in os.environ:
        return None
    launcher = os.getppid()

    def watch():
        import time

        while os.getppid() == launcher:
            time.sleep(poll_seconds)
        print(f"diffalign: the launcher (pid {launcher}) is gone: stopping this worker (pid {os.getpid()})",
              file=sys.stderr, flush=True)
        os._exit(1)  # the run lock is a flock: the kernel releases it with the process

    thread = threading.Thread(target=watch, name="diffalign-launcher-watchdog", daemon=True)
    thread.start()
    return thread


def _check_reward_names(config):
    """Unknown reward names (`reward`, `eval_reward`, the parts of a mixture) as one line before any model loads,
    with "did you mean"."""
    from diffalign.config import did_you_mean
    from diffalign.rewards import UnknownRewardError, available_rewards

    for key in ("reward", "eval_reward"):
        spec = getattr(config, key, None)
        names = [spec] if isinstance(spec, str) else list(spec) if isinstance(spec, dict) else []
        for name in names:
            if isinstance(name, str) and ":" not in name and name not in available_rewards():
                raise UnknownRewardError(f"unknown {key} '{name}'{did_you_mean(name, available_rewards())}; "
                                         f"available: {', '.join(available_rewards())}")


PROMPT_SOURCES = ("prompts", "prompt_file", "prompt_fn", "prompt_dataset")


def _check_prompt_override(config, preset: Optional[str]):
    """A preset's prompt source and another one from the command line: say that the preset sets it and how to clear
    it (one prompt source per run), instead of only "give only one of"."""
    from diffalign.config import ConfigError

    given = [key for key in PROMPT_SOURCES if getattr(config, key, None)]
    if not preset or len(given) < 2:
        return
    from_preset = [key for key in given if key in _yaml_keys(preset)]
    others = [key for key in given if key not in from_preset]
    if from_preset and others:
        key = from_preset[0]
        raise ConfigError(f"the preset '{preset}' sets {key}: {getattr(config, key)!r}, and --{others[0]} gives "
                          f"another prompt source (a run has one): add --{key} null to clear the preset's")


def _say_defaults(algorithm: str, config):
    """`diffalign train ALGORITHM` without --config trains with the config class' defaults: say which (on stdout,
    with the run's result), so that a 100-epoch run on a JPEG reward never starts unannounced."""
    source = next((f"{key} {getattr(config, key)!r}" for key in PROMPT_SOURCES if getattr(config, key, None)),
                  "prompt_fn 'digits' (built-in)")
    print(f"diffalign: no --config: training {algorithm} with its defaults, model '{config.model}', reward "
          f"{config.reward!r}, {source}, {config.num_epochs} epochs, output_dir '{config.output_dir}' "
          f"(presets: --config digits-{algorithm}, ...; every key: diffalign train {algorithm} --help)", flush=True)


def train_command(args, extra: List[str]) -> int:
    from diffalign.config import ConfigError, config_help, load_config

    if args.algorithm is None:
        if args.help:
            args.train_parser.print_help()
            return 0
        raise ConfigError("diffalign train needs an algorithm: ddpo or prdp (diffalign train prdp --help lists "
                          "its config keys)")
    if args.help:
        print(config_help(args.algorithm))
        return 0
    stop_with_launcher()
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
    from diffalign.runlog import check_output_dir

    check_output_dir(config.output_dir)
    # every check that needs no model before the heavy imports: values, batch arithmetic, then the model location
    _check_prompt_override(config, args.config)
    config.validate(launched_processes())
    _check_reward_names(config)
    from diffalign.families import check_model_resolution  # torch, not diffusers
    from diffalign.utils.hub_utils import resolve_model_path

    resolve_model_path(config.model)
    check_model_resolution(config.model, config.sample_resolution)
    if not args.config and not config.resume_from and _is_main_launch():
        _say_defaults(args.algorithm, config)
    quiet_libraries()
    from diffalign.trainers import trainer_class

    trainer_cls = trainer_class(args.algorithm)
    trainer = trainer_cls(config)
    history = trainer.train()
    if trainer.accelerator.is_main_process and history:
        first, last = history[0], history[-1]
        print(f"reward {first['reward_mean']:.4f} -> {last['reward_mean']:.4f} over {len(history)} epochs; "
              f"outputs in {config.output_dir}")
    return 0


def _is_main_launch() -> bool:
    return os.environ.get("RANK", "0") == "0"


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
    from diffalign import __version__

    parser.add_argument("--version", action="version", version=f"diffalign {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fine-tune with a reward (ddpo or prdp)", add_help=False)
    from diffalign.config import CONFIG_CLASSES

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


if __name__ == "__main__":
    sys.exit(main())
