"""`diffalign train <algorithm>`: the way in of a training run. The config is loaded (`diffalign.cli.parser`),
checked once for the launch's process count and its model resolved once, all before torch loads; then the
algorithm's trainer (`diffalign.trainers.trainer_class`) runs it."""

import os
import sys
from typing import List, Optional

from diffalign.utils.logging_utils import quiet_libraries
from diffalign.utils.process_utils import launched_processes


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
    from diffalign.errors import did_you_mean
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
    from diffalign.errors import ConfigError

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
    from diffalign.cli.parser import config_help, load_config
    from diffalign.errors import ConfigError

    if args.algorithm is None:
        if args.help:
            args.train_parser.print_help()
            return 0
        from diffalign.trainers import CONFIG_CLASSES

        raise ConfigError(f"diffalign train needs an algorithm: {', '.join(CONFIG_CLASSES)} (diffalign train prdp "
                          "--help lists its config keys)")
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
    from diffalign.runlog import check_output_dir

    check_output_dir(config.output_dir)
    # every check that needs no model before the heavy imports: values, batch arithmetic, then the model location.
    # The trainer finds the config checked for this process count and the model resolved, and does neither again.
    _check_prompt_override(config, args.config)
    config.check(launched_processes())
    _check_reward_names(config)
    model_path = config.resolved_model()
    if os.path.isdir(model_path):  # a hub id is checked once loaded
        from diffalign.families import check_model_resolution  # torch, not diffusers

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

    from diffalign.cli.parser import preset_path

    with open(preset_path(config)) as f:
        data = yaml.safe_load(f) or {}
    return set(data) if isinstance(data, dict) else set()
