"""Callbacks of the training loop: the services around a run (trackers, the model card, the Hub push) receive what
they need through these hooks, as transformers' and TRL's callbacks do, instead of reading the trainer.

Every hook is called on every process, in the order of the trainer's `callbacks` list:

- `on_train_begin(state)`: before the first epoch;
- `on_epoch_end(state, metrics)`: after each epoch's metrics are written;
- `on_save(state)`: after the result (`final/`, grids, `final_eval.json`) is written;
- `on_train_end(state)`: last, once every process has reached it.
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from .. import tracking
from ..modelcard import push_to_hub, warn_if_offline, write_model_card


@dataclass
class TrainerState:
    """What the loop tells its callbacks.

    Attributes:
        config (`TrainConfig`), accelerator (`accelerate.Accelerator`): the run's.
        epoch (`int`): the epoch that just ended (`-1` before the first).
        metrics_history (`List[Dict]`): every epoch's metrics so far.
        family (`ModelFamily`), resolution (`int`), reward_label (`str`), grid_prompt (`str`): what the model card
            describes.
        scored_grid (`() -> (Trajectories, scores) or None`): samples and scores the fixed-seed grid (call it on
            every process; `None` on the processes that do not log).
    """

    config: object
    accelerator: object
    family: object = None
    resolution: Optional[int] = None
    reward_label: Optional[str] = None
    grid_prompt: Optional[str] = None
    scored_grid: Optional[Callable[[], Optional[Tuple]]] = None
    epoch: int = -1
    metrics_history: List[Dict] = field(default_factory=list)


class TrainerCallback:
    """A no-op base: override the hooks a service needs."""

    def on_train_begin(self, state: TrainerState):
        pass

    def on_epoch_end(self, state: TrainerState, metrics: Dict):
        pass

    def on_save(self, state: TrainerState):
        pass

    def on_train_end(self, state: TrainerState):
        pass


class TrackerCallback(TrainerCallback):
    """`report_to`: accelerate's trackers (`diffalign.tracking.RunTracker`; none by default)."""

    def __init__(self, state: TrainerState):
        self.tracker = tracking.RunTracker(state.config, state.accelerator, state.scored_grid, state.resolution)

    def on_train_begin(self, state):
        self.tracker.start()

    def on_epoch_end(self, state, metrics):
        self.tracker.log_epoch(metrics, state.epoch)

    def on_train_end(self, state):
        self.tracker.end()


class ModelCardCallback(TrainerCallback):
    """`final/README.md`, written by the main process once `final_eval.json` (its table) exists."""

    def on_save(self, state):
        if state.accelerator.is_main_process:
            write_model_card(state.config, family=state.family, reward_label=state.reward_label,
                             grid_prompt=state.grid_prompt, resolution=state.resolution,
                             history=state.metrics_history)


class HubCallback(TrainerCallback):
    """`push_to_hub`: warned at the start when offline; pushed last (a failed push, one line, loses nothing)."""

    def on_train_begin(self, state):
        warn_if_offline(state.config)  # the one-line error comes at the end

    def on_train_end(self, state):
        if state.config.push_to_hub and state.accelerator.is_main_process:
            push_to_hub(state.config)
