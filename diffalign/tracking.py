"""Experiment trackers (TensorBoard, Weights & Biases, Trackio, MLflow) through accelerate, as diffusers' training
examples use them: `report_to` picks the trackers, the `Accelerator` is built with `log_with=` and the run directory
as its project directory, `init_trackers` records the config as hyperparameters, every epoch's scalar metrics go to
`accelerator.log(..., step=epoch)` and every `log_images_every` epochs a captioned sample grid goes to each tracker in
its own image format (`accelerator.get_tracker(name, unwrap=True)`). `metrics.jsonl` is written either way. Videos
(`[B, F, 3, H, W]` samples) make an animated grid: an animated GIF image summary in TensorBoard (no moviepy needed),
and the grid's video file (`diffalign.plotting.save_video`, kept as `<output_dir>/logs/samples_epoch_<epoch>.mp4`)
as a `wandb.Video`, a `trackio.Video` and an MLflow artifact.

Each tracker is an optional extra (`pip install 'diffalign[tensorboard]'`, `[wandb]`, `[trackio]`, `[mlflow]`, or
`[trackers]` for all): a requested tracker whose package is missing is a one-line `TrackerError` before any model
loads. Where the data goes: TensorBoard writes under `<output_dir>/logs/<tracker_project_name>/`; W&B runs in its
configured mode (`WANDB_MODE=offline` keeps it under `<output_dir>/wandb/`); Trackio logs to its local database
unless told of a Space; MLflow logs to `MLFLOW_TRACKING_URI`, by default `<output_dir>/mlflow.db` (artifacts, the
sample grids among them, in `<output_dir>/mlartifacts`).
"""

import importlib.util
import json
import logging
import math
import os
import textwrap
from typing import Dict, List, Optional

from .errors import TrackerError

logger = logging.getLogger("diffalign")

# tracker name (accelerate's `log_with`) -> the module it needs; the pip extra has the tracker's name
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}


def parse_report_to(report_to: Optional[str]) -> List[str]:
    """The tracker names of a `report_to` value (`"tensorboard,wandb"`, `"all"`; `None`, `""` or `"none"`: no
    tracker), in order and without repeats. Raises `ConfigError` for an unknown name."""
    from .errors import ConfigError, did_you_mean

    if report_to is None:
        return []
    names = []
    for name in (part.strip().lower() for part in str(report_to).split(",")):
        if not name or name == "none":
            continue
        if name != "all" and name not in TRACKERS:
            raise ConfigError(f"report_to: unknown tracker '{name}'{did_you_mean(name, list(TRACKERS) + ['all'])} "
                              f"(choose from {', '.join(TRACKERS)} or all, comma-separated)")
        if name not in names:
            names.append(name)
    return names


def _installed(name: str) -> bool:
    if name == "tensorboard":  # torch's SummaryWriter needs the tensorboard package
        return importlib.util.find_spec("tensorboard") is not None
    return importlib.util.find_spec(TRACKERS[name]) is not None


def resolve_trackers(report_to: Optional[str]) -> List[str]:
    """The trackers to start: the names of `report_to`, `all` meaning every supported tracker that is installed.

    Raises `TrackerError` (one line naming the pip extra) for a named tracker that is not installed, or for `all` when
    none is."""
    names = parse_report_to(report_to)
    if "all" in names:
        installed = [n for n in TRACKERS if _installed(n)]
        if not installed:
            raise TrackerError("report_to: all, but no tracker is installed: pip install 'diffalign[trackers]' (or "
                               f"one of the extras {', '.join(TRACKERS)})")
        names = [n for n in names if n != "all"]
        names += [n for n in installed if n not in names]
    missing = [n for n in names if not _installed(n)]
    if missing:
        extras = ",".join(missing)
        raise TrackerError(f"report_to: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed: "
                           f"pip install 'diffalign[{extras}]'")
    return names


def logging_dir(config) -> str:
    return os.path.join(config.output_dir, "logs")


def accelerator_kwargs(config) -> dict:
    """`log_with` and `project_config` for the run's `Accelerator` (checks that the trackers are installed)."""
    from accelerate.utils import ProjectConfiguration

    names = resolve_trackers(config.report_to)
    return {
        "log_with": names or None,
        "project_config": ProjectConfiguration(project_dir=config.output_dir, logging_dir=logging_dir(config)),
    }


def check_accelerator(accelerator, config):
    """A caller's own `Accelerator` must have been built with the trackers of `report_to` (accelerate fixes
    `log_with` at construction)."""
    from .errors import ConfigError

    names = resolve_trackers(config.report_to)
    have = {str(getattr(t, "value", t)) for t in (accelerator.log_with or [])}
    missing = [n for n in names if n not in have]
    if missing:
        raise ConfigError(f"report_to: the Accelerator passed to the trainer was built without {', '.join(missing)}; "
                          f"build it with log_with={names!r} or leave the accelerator out")


def run_name(config) -> str:
    """`config.run_name`, by default the name of the output directory."""
    return config.run_name or os.path.basename(os.path.normpath(os.path.abspath(config.output_dir)))


def hyperparameters(config) -> Dict[str, object]:
    """The config as flat hyperparameters, secrets redacted (`diffalign.utils.redaction`): numbers, booleans and
    strings as they are, `None` as `None` (TensorBoard leaves it out), lists and mappings as JSON strings (trackers
    accept only scalar hyperparameters)."""
    from .utils.redaction import redact

    values = {"algorithm": config.algorithm}
    for key, value in redact(config.to_dict()).items():
        if value is None or isinstance(value, (bool, int, float, str)):
            values[key] = value
        else:
            values[key] = json.dumps(value, sort_keys=True, default=str)
    return values


def scalars(metrics: Dict) -> Dict[str, float]:
    """The finite numeric metrics of an epoch (`epoch` itself is the step). A non-finite value is left out here; it
    stays in `metrics.jsonl` as `null`."""
    out = {}
    for key, value in metrics.items():
        if key == "epoch" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


def captioned_grid(images, captions: List[str], nrow: int, scale: int = 1, padding: int = 2, lines: int = 3):
    """`(N, 3, H, W)` images in [0, 1] as one PIL image, each tile (upscaled by `scale`) with its caption wrapped
    under it (at most `lines` lines; a newline starts a new line): a grid that says what each sample was asked for
    and what it scored."""
    from PIL import Image, ImageDraw, ImageFont

    from .plotting import image_grid

    n, _, h, w = images.shape
    tile_w, tile_h = w * scale, h * scale
    font = ImageFont.load_default()
    line_h = 12
    chars = max(8, tile_w // 6)
    wrapped = [[w for part in c.split("\n") for w in textwrap.wrap(part, chars)][:lines] for c in captions]
    text_h = line_h * max((len(c) for c in wrapped), default=0) + padding
    rows = math.ceil(n / nrow)
    canvas = Image.new("RGB", (nrow * (tile_w + padding) + padding, rows * (tile_h + text_h + padding) + padding),
                       "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, c = divmod(i, nrow)
        left, top = padding + c * (tile_w + padding), padding + r * (tile_h + text_h + padding)
        canvas.paste(image_grid(images[i : i + 1], nrow=1, padding=0, scale=scale), (left, top))
        for j, line in enumerate(wrapped[i]):
            draw.text((left, top + tile_h + 1 + j * line_h), line, fill="black", font=font)
    return canvas


def animated_image_summary(tag: str, frames):
    """A TensorBoard `Summary` holding `frames` (PIL images) as one animated GIF image, as torch's `add_video` makes
    it, without its moviepy dependency: TensorBoard's image plugin plays it."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    from .plotting import gif_bytes

    image = Summary.Image(height=frames[0].height, width=frames[0].width, colorspace=3,
                          encoded_image_string=gif_bytes(frames))
    return Summary(value=[Summary.Value(tag=tag, image=image)])


class RunTracker:
    """The trackers of one training run; every method is called on every process (accelerate logs on the main
    process only; sample grids are drawn by the processes that take part in the trainer's grid sampling)."""

    def __init__(self, config, accelerator, scored_grid=None, resolution=None):
        """`scored_grid()`: the fixed-seed grid samples and their scores on the main process, `None` elsewhere
        (called on every process); `resolution`: the samples' (for the grid's scale)."""
        self.config = config
        self.accelerator = accelerator
        self.scored_grid = scored_grid
        self.resolution = resolution
        self.active = bool(self.accelerator.log_with)

    def start(self):
        if not self.active:
            return
        config, name = self.config, run_name(self.config)
        init_kwargs = {"wandb": {"name": name, "dir": config.output_dir}, "trackio": {"name": name},
                       "mlflow": {"run_name": name}}
        if "mlflow" in self._names() and not os.environ.get("MLFLOW_TRACKING_URI"):
            # no server configured: a database and artifacts in the run directory (MLflow 3 refuses a bare
            # ./mlruns file store, and its defaults would write into the working directory)
            import mlflow

            root = os.path.abspath(config.output_dir)
            mlflow.set_tracking_uri(f"sqlite:///{os.path.join(root, 'mlflow.db')}")
            init_kwargs["mlflow"]["logging_dir"] = os.path.join(root, "mlartifacts")
        self.accelerator.init_trackers(config.tracker_project_name, config=hyperparameters(config),
                                       init_kwargs=init_kwargs)

    def _names(self) -> List[str]:
        return [str(getattr(t, "value", t)) for t in (self.accelerator.log_with or [])]

    def log_epoch(self, metrics: Dict, epoch: int):
        """The epoch's scalars, and every `log_images_every` epochs (and after the last) a captioned sample grid."""
        if not self.active:
            return
        self.accelerator.log(scalars(metrics), step=epoch)
        every = self.config.log_images_every
        if every and ((epoch + 1) % every == 0 or epoch + 1 == self.config.num_epochs):
            self.log_samples(epoch)

    def log_samples(self, epoch: int):
        """Samples the fixed-seed grid (`scored_grid`, which leaves the global RNG as it was), scores it and logs it
        captioned with each image's prompt and reward."""
        sampled = self.scored_grid() if self.scored_grid is not None else None
        if sampled is None:
            return
        trajectories, scores = sampled
        captions = []
        for i, prompt in enumerate(trajectories.prompts):
            caption = f"{prompt}\nreward {float(scores['reward'][i]):.4g}"
            if "eval" in scores:
                caption += f", eval {float(scores['eval'][i]):.4g}"
            captions.append(caption)
        images = trajectories.images.detach().float().clamp(0, 1).cpu()
        from .plotting import grid_scale

        nrow = math.ceil(math.sqrt(len(images)))
        captions_text = [c.replace("\n", " | ") for c in captions]  # trackers' own captions are one line
        if images.ndim == 5:
            return self.log_videos(images, captions, captions_text, nrow, epoch)
        grid = captioned_grid(images, captions, nrow, scale=grid_scale(self.resolution))
        for name in self._names():
            tracker = self.accelerator.get_tracker(name, unwrap=True)
            getattr(self, f"_images_{name}")(tracker, images, grid, captions_text, epoch)

    @staticmethod
    def _images_tensorboard(writer, images, grid, captions, epoch):
        import numpy as np

        writer.add_image("samples", np.asarray(grid), epoch, dataformats="HWC")
        writer.add_images("samples/images", images, epoch)
        writer.add_text("samples/captions", "\n\n".join(f"{i}. {c}" for i, c in enumerate(captions)), epoch)
        writer.flush()

    @staticmethod
    def _images_wandb(run, images, grid, captions, epoch):
        import wandb

        from .plotting import image_grid

        run.log({"samples": [wandb.Image(image_grid(images[i : i + 1], nrow=1, padding=0), caption=c)
                             for i, c in enumerate(captions)],
                 "samples_grid": wandb.Image(grid, caption=f"epoch {epoch}")}, step=epoch)

    @staticmethod
    def _images_trackio(run, images, grid, captions, epoch):
        import trackio

        run.log({"samples": trackio.Image(grid, caption=" / ".join(captions))}, step=epoch)

    @staticmethod
    def _images_mlflow(active_run, images, grid, captions, epoch):
        import mlflow

        mlflow.log_image(grid, key="samples", step=epoch)
        mlflow.log_text("\n".join(captions), f"samples/captions_epoch_{epoch:05d}.txt")

    def log_videos(self, videos, captions: List[str], captions_text: List[str], nrow: int, epoch: int):
        """The animated captioned grid of `videos` `(N, F, 3, H, W)`: its frames (`captioned_grid` of each frame)
        to TensorBoard as an animated GIF, and its video file to the trackers that take files."""
        from .plotting import grid_scale, save_video

        scale = grid_scale(self.resolution)
        frames = [captioned_grid(videos[:, f], captions, nrow, scale=scale) for f in range(videos.shape[1])]
        names = self._names()
        path = None
        if any(name != "tensorboard" for name in names):
            os.makedirs(logging_dir(self.config), exist_ok=True)
            path = save_video(frames, os.path.join(logging_dir(self.config), f"samples_epoch_{epoch:05d}"))
        for name in names:
            tracker = self.accelerator.get_tracker(name, unwrap=True)
            getattr(self, f"_videos_{name}")(tracker, frames, path, captions_text, epoch)

    @staticmethod
    def _videos_tensorboard(writer, frames, path, captions, epoch):
        writer._get_file_writer().add_summary(animated_image_summary("samples", frames), epoch)
        writer.add_text("samples/captions", "\n\n".join(f"{i}. {c}" for i, c in enumerate(captions)), epoch)
        writer.flush()

    @staticmethod
    def _videos_wandb(run, frames, path, captions, epoch):
        import wandb

        run.log({"samples_grid": wandb.Video(path, caption=f"epoch {epoch}: " + " / ".join(captions))}, step=epoch)

    @staticmethod
    def _videos_trackio(run, frames, path, captions, epoch):
        import trackio

        run.log({"samples": trackio.Video(path, caption=" / ".join(captions))}, step=epoch)

    @staticmethod
    def _videos_mlflow(active_run, frames, path, captions, epoch):
        import mlflow

        mlflow.log_artifact(path, artifact_path="samples")
        mlflow.log_text("\n".join(captions), f"samples/captions_epoch_{epoch:05d}.txt")

    def end(self):
        """Finishes the trackers (flushes TensorBoard, closes the W&B/Trackio/MLflow runs): `end_training` without
        its `destroy_process_group`, which would end a multi-process caller's process group with `train()`."""
        if self.active:
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.accelerator.trackers = []
