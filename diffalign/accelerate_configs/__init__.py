"""accelerate launch configs shipped with diffalign: `multi_gpu` (DDP, the default engine), `fsdp` (FSDP2), `zero2`,
`zero3` (DeepSpeed) and `multi_node`.

```bash
diffalign train prdp --config my.yaml --accelerate-config fsdp       # one process per visible GPU
accelerate launch --config_file "$(python -m diffalign.accelerate_configs fsdp)" --num_processes 8 \\
    -m diffalign.cli train prdp --config my.yaml
```

`DIFFALIGN_LAUNCH_ARGS` adds `accelerate launch` flags to `--accelerate-config` (e.g. `--num_processes 4`, or
`--machine_rank 1 --main_process_ip 10.0.0.1` on the second machine of a `multi_node` run).
"""

import os
import shlex
import sys
from importlib import resources
from typing import List, Optional

from ..errors import LaunchConfigError

NAMES = ("multi_gpu", "fsdp", "zero2", "zero3", "multi_node")


def config_path(name_or_path: str) -> str:
    """The file of a shipped config (`fsdp`, ...) or an existing YAML/JSON path."""
    if os.path.isfile(name_or_path):
        return os.path.abspath(name_or_path)
    name = name_or_path[:-5] if name_or_path.endswith(".yaml") else name_or_path
    if name in NAMES:
        return str(resources.files(__name__).joinpath(f"{name}.yaml"))
    raise LaunchConfigError(f"accelerate config '{name_or_path}' is neither a file nor one of {', '.join(NAMES)}")


def _config_values(path: str) -> dict:
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    return data if isinstance(data, dict) else {}


def _local_devices() -> int:
    import torch

    return torch.cuda.device_count()


def launch_command(name_or_path: str, cli_args: List[str], extra: Optional[List[str]] = None) -> List[str]:
    """`accelerate launch --config_file <config> [--num_processes N] <extra> -m diffalign.cli <cli_args>`.

    Without `--num_processes` in the config or in `extra`, every machine runs one process per visible GPU."""
    path = config_path(name_or_path)
    extra = list(extra if extra is not None else shlex.split(os.environ.get("DIFFALIGN_LAUNCH_ARGS", "")))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", path]
    values = _config_values(path)
    given = any(a == "--num_processes" or a.startswith("--num_processes=") for a in extra)
    if not given and int(values.get("num_processes", -1) or -1) < 1:
        devices = _local_devices()
        if devices < 1:
            raise LaunchConfigError(
                f"--accelerate-config {name_or_path}: no GPU visible; give the process count with "
                "DIFFALIGN_LAUNCH_ARGS='--num_processes N' (CPU processes also need ACCELERATE_USE_CPU=true)")
        command += ["--num_processes", str(devices * int(values.get("num_machines", 1) or 1))]
    return command + extra + ["-m", "diffalign.cli"] + list(cli_args)


def launch(name_or_path: str, cli_args: List[str]) -> int:
    """Runs `diffalign <cli_args>` under `accelerate launch` with a shipped config; returns its exit code."""
    import subprocess

    return subprocess.call(launch_command(name_or_path, cli_args))


if __name__ == "__main__":  # `python -m diffalign.accelerate_configs NAME` prints the config's path
    if len(sys.argv) != 2:
        print(f"usage: python -m diffalign.accelerate_configs {{{','.join(NAMES)}}}", file=sys.stderr)
        sys.exit(2)
    try:
        print(config_path(sys.argv[1]))
    except LaunchConfigError as e:
        print(f"diffalign: error: {e}", file=sys.stderr)
        sys.exit(2)
