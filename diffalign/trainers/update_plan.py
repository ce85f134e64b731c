"""Optimizer steps over the global batch of an epoch, across processes: the one module that knows N processes.

A trainer's epoch holds `num_global` samples spread over the processes (`GlobalLayout`). Each optimizer step takes
some *units* of them (a sample for DDPO, a prompt group for PRDP) from a permutation that is the same on every process
and for any number of processes. Each process then runs the forwards of its own *rows* (a `(sample, step)` pair of a
trajectory, or a sample when the algorithm trains on final samples only) in micro-batches, padded with zero-weight
forwards so that every process runs as many (a sharded denoiser gathers its weights in every forward), and weights its
loss so that the engine's average over processes gives the step's global mean. Gradients are reduced in the last
backward of the step.

The algorithm states only its loss (`BaseTrainer.compute_loss`) and, when its loss couples the rows of a step (PRDP's
pairs), the unit the loss is a mean over (`BaseTrainer.loss_weight`). `run_update` drives one optimizer step in one of
three ways:

- `"micro_batch"`: the loss is a mean over rows, so each micro-batch backpropagates its own loss (DDPO);
- `"single_pass"`: the loss needs every row of the step at once: one autograd graph over all micro-batches;
- `"two_pass"`: the same gradient with one micro-batch of activations at a time (see `run_update`).
"""

from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ..distributed import max_count, micro_batch_count, micro_batch_slots


class GlobalLayout:
    """Where the samples of a training set live across processes, so that the trainers can plan on the global batch.

    Each process holds `num_local` samples in blocks of `per_block` (one block per epoch: replayed epochs first, then
    the fresh one). Global block `b` is every process's block `b` in process order, so a global index `g` lives on
    process `(g % (per_block * P)) // per_block`. With one process, global and local indices coincide.
    """

    def __init__(self, num_local: int, per_block: int, num_processes: int, process_index: int):
        self.per_block = per_block
        self.blocks = num_local // per_block
        self.global_block = per_block * num_processes
        self.num_global = self.blocks * self.global_block
        self.num_processes = num_processes
        self.process_index = process_index

    def owner(self, index: torch.Tensor) -> torch.Tensor:
        return (index % self.global_block) // self.per_block

    def local_index(self, index: torch.Tensor) -> torch.Tensor:
        """Local positions of global indices owned by this process."""
        return (index // self.global_block) * self.per_block + (index % self.global_block) % self.per_block

    def global_rows(self, local_rows: torch.Tensor) -> torch.Tensor:
        """`(num_global, ...)` from per-sample values that are the same for every sample of a block (the SDE window
        of an epoch)."""
        firsts = local_rows[:: self.per_block][: self.blocks]
        return firsts.repeat_interleave(self.global_block, dim=0)


@dataclass
class Rows:
    """A micro-batch of this process's rows: `samples` (local indices into the training batch) and, for trainers that
    train on trajectory steps, the `steps` (indices into the recorded transitions) of each; `None` for trainers that
    train on final samples only. `padding` marks a zero-weight forward that only keeps the count of forwards equal."""

    samples: torch.Tensor
    steps: Optional[torch.Tensor]
    padding: bool = False

    def __len__(self) -> int:
        return self.samples.shape[0]


@dataclass
class UpdatePlan:
    """One optimizer step across processes.

    Attributes:
        samples (`torch.LongTensor`): `(n,)` this process's samples of the step (local indices).
        steps (`torch.LongTensor` or `None`): `(n, S)` the trajectory steps each sample trains; `None` for trainers
            that train on final samples only.
        local_weight, global_weight (`int`): the count the loss is a mean over (rows by default, PRDP's pairs), here
            and on all processes.
        global_rows (`int`): the rows of the step on all processes.
        slots (`int`): the forwards each process runs (the most micro-batches any process needs).
        num_processes (`int`).
    """

    samples: torch.Tensor
    steps: Optional[torch.Tensor]
    local_weight: int
    global_weight: int
    global_rows: int
    slots: int
    num_processes: int

    @property
    def scale(self) -> float:
        """Weight of this process's mean loss: its share of the step's loss weight, times the process count that the
        engine's gradient average divides by."""
        return self.num_processes * self.local_weight / self.global_weight if self.global_weight else 0.0

    @property
    def steps_per_sample(self) -> int:
        return self.steps.shape[1] if self.steps is not None else 1

    def rows(self, device) -> Rows:
        """This process's rows of the step, sample-major (`S` steps of a sample in a row)."""
        samples = self.samples.repeat_interleave(self.steps_per_sample).to(device)
        steps = self.steps.reshape(-1).to(device) if self.steps is not None else None
        return Rows(samples, steps)

    def micro_batches(self, rows: Rows, micro_batch_size: int) -> List[Optional[slice]]:
        """`slots` positions into `rows`: slices, then `None` for the padding forwards."""
        return micro_batch_slots(len(rows), micro_batch_size, self.slots)


def local_plan(samples: torch.Tensor, steps: Optional[torch.Tensor], micro_batch_size: int,
               weight: Optional[int] = None) -> UpdatePlan:
    """The plan of an update that this process alone makes (a direct call, as in the tests)."""
    rows = samples.shape[0] * (steps.shape[1] if steps is not None else 1)
    weight = rows if weight is None else weight
    return UpdatePlan(samples=samples, steps=steps, local_weight=weight, global_weight=weight, global_rows=rows,
                      slots=max_count([micro_batch_count(rows, micro_batch_size)]), num_processes=1)


def plan_updates(layout: GlobalLayout, order: torch.Tensor, unit_size: int, units_per_step: int,
                 step_plan: Optional[torch.Tensor], micro_batch_size: int,
                 loss_weight: Optional[Callable[[torch.Tensor], int]] = None,
                 sorted_samples: bool = False) -> Iterator[UpdatePlan]:
    """The optimizer steps of one pass over the global batch.

    Args:
        layout (`GlobalLayout`): where the samples live.
        order (`torch.LongTensor`): a permutation of the `layout.num_global // unit_size` units (the same on every
            process); unit `u` is the global samples `u * unit_size ... (u + 1) * unit_size - 1`.
        unit_size (`int`): samples per unit (1: samples; `sample_images_per_prompt`: prompt groups).
        units_per_step (`int`): units per optimizer step, over all processes.
        step_plan (`torch.LongTensor` or `None`): `(num_global, S)` the steps each global sample trains; `None` when
            the algorithm trains on final samples only (one row per sample).
        micro_batch_size (`int`): rows per forward.
        loss_weight (*optional*): `units -> int or None`, the count the loss is a mean over for those global units
            (PRDP: their counted pairs); by default (or None) their rows.
        sorted_samples (`bool`): this process's units in index order instead of the permutation's (the order of its
            rows; a loss over whole groups is the same either way).
    """
    per_sample = step_plan.shape[1] if step_plan is not None else 1
    num_units = layout.num_global // unit_size
    unit_owner = layout.owner(torch.arange(num_units) * unit_size)
    within = torch.arange(unit_size)
    for start in range(0, num_units, units_per_step):
        chosen = order[start : start + units_per_step]
        mine = chosen[unit_owner[chosen] == layout.process_index]
        if sorted_samples:
            mine = mine.sort().values
        global_samples = (mine[:, None] * unit_size + within[None, :]).reshape(-1)
        rows = [int((unit_owner[chosen] == r).sum()) * unit_size * per_sample for r in range(layout.num_processes)]
        local_weight, global_weight = rows[layout.process_index], sum(rows)
        if loss_weight is not None and loss_weight(chosen) is not None:
            local_weight, global_weight = loss_weight(mine), loss_weight(chosen)
        yield UpdatePlan(
            samples=layout.local_index(global_samples),
            steps=step_plan[global_samples] if step_plan is not None else None,
            local_weight=local_weight,
            global_weight=global_weight,
            global_rows=sum(rows),
            slots=max_count(micro_batch_count(x, micro_batch_size) for x in rows),
            num_processes=layout.num_processes,
        )


def planned_steps(plans: List[torch.Tensor], num_steps: int) -> torch.Tensor:
    """`(num_samples, num_steps)` mask of the steps that any of the `(num_samples, S)` step plans trains."""
    mask = torch.zeros(plans[0].shape[0], num_steps, dtype=torch.bool)
    for plan in plans:
        mask.scatter_(1, plan, True)
    return mask


def padding_slots(rows: int, micro_batch_size: int, counts: Sequence[int]) -> List[Optional[slice]]:
    """Micro-batches over `rows` rows, padded to the most any process needs (`counts`: every process's rows)."""
    return micro_batch_slots(rows, micro_batch_size, max_count(micro_batch_count(x, micro_batch_size) for x in counts))


def update_mode(loss_scope: str, two_pass: Optional[bool], slots: int) -> str:
    """How an optimizer step runs: per micro-batch for a loss that is a mean over rows; otherwise one graph, or two
    passes (by default when the step needs more than one micro-batch: memory bounded by the micro-batch)."""
    if loss_scope == "rows":
        return "micro_batch"
    two_pass = two_pass if two_pass is not None else slots > 1
    return "two_pass" if two_pass else "single_pass"


def run_update(trainer, batch, plan: UpdatePlan, mode: str) -> Dict[str, float]:
    """Forwards and backwards of this process's rows of one optimizer step; returns the step's global statistics.

    `micro_batch`: each micro-batch's loss (a mean over its rows) is weighted by its share of the step's global rows
    (zero for a padding forward) and by the process count the engine's average divides by, and backpropagated; its
    statistics (means over its rows) are averaged the same way.

    `single_pass` / `two_pass`: the loss of the step needs all of its rows (`trainer.compute_loss(outputs, batch,
    plan)` on the `(n, S)` outputs). Single pass: one graph over every micro-batch, one backward. Two passes: the loss
    depends on theta only through the outputs `o`, so dL/dtheta = sum_i (dL/do_i) do_i/dtheta; a no-grad pass gives
    the outputs and the coefficients dL/do, then each micro-batch backpropagates `sum(coef * o)`. Statistics are sums
    over this process's part, divided by the step's global weight (or rows) after summing over processes.
    """
    if mode == "micro_batch":
        return _micro_batch_update(trainer, batch, plan)
    return _whole_step_update(trainer, batch, plan, two_pass=mode == "two_pass")


def padding_rows(trainer, batch) -> Rows:
    """A zero-weight forward of a recorded transition (or sample): the same number of forwards everywhere."""
    sample = torch.zeros(1, dtype=torch.long, device=trainer.device)
    if not trainer.keeps_trajectory:
        return Rows(sample, None, padding=True)
    step = batch.trajectories.stochastic[0].nonzero()[:1, 0].to(trainer.device)
    return Rows(sample, step, padding=True)


def _micro_batch_update(trainer, batch, plan: UpdatePlan) -> Dict[str, float]:
    acc, keys = trainer.accelerator, trainer.loss_stats
    rows = plan.rows(trainer.device)
    total = plan.global_rows
    # Accumulated as tensors and read once per optimizer step (an `.item()` per micro-batch would sync the GPU).
    sums = torch.zeros(len(keys), device=trainer.device)
    slots = plan.micro_batches(rows, trainer.config.train_micro_batch_size)
    for i, positions in enumerate(slots):
        pad = positions is None
        part = padding_rows(trainer, batch) if pad else Rows(
            rows.samples[positions], rows.steps[positions] if rows.steps is not None else None)
        outputs = trainer.model_outputs(trainer.denoiser, batch, part)
        weight = 0.0 if pad else len(part) / total
        loss, stats = trainer.compute_loss(outputs, batch, part)
        # A non-finite loss gives a non-finite gradient norm, and `optimizer_step` then skips the update.
        with trainer.gradient_sync(last=i == len(slots) - 1):
            trainer.backward(loss * (weight * acc.num_processes))
        for key, value in stats.items():
            sums[keys.index(key)] += value * weight
    if acc.num_processes > 1:
        sums = acc.reduce(sums, reduction="sum")
    return dict(zip(keys, sums.tolist()))


def step_outputs(trainer, model, batch, plan: UpdatePlan, rows: Rows) -> Tuple[torch.Tensor, torch.Tensor]:
    """`((n, S) outputs of the step's rows, padding term)` in `plan.slots` micro-batches (graph kept if grad is
    enabled; the padding term is a zero that keeps the padding forwards in the graph)."""
    chunks, pad = [], torch.zeros((), device=trainer.device)
    for positions in plan.micro_batches(rows, trainer.config.train_micro_batch_size):
        if positions is None:
            pad = pad + trainer.model_outputs(model, batch, padding_rows(trainer, batch)).sum() * 0.0
        else:
            chunks.append(trainer.model_outputs(model, batch, _part(rows, positions)))
    outputs = torch.cat(chunks) if chunks else torch.zeros(0, device=trainer.device)
    return outputs.view(plan.samples.shape[0], plan.steps_per_sample), pad


def _part(rows: Rows, positions: slice) -> Rows:
    return Rows(rows.samples[positions], rows.steps[positions] if rows.steps is not None else None)


def _whole_step_update(trainer, batch, plan: UpdatePlan, two_pass: bool) -> Dict[str, float]:
    rows = plan.rows(trainer.device)
    if not two_pass:
        outputs, pad = step_outputs(trainer, trainer.denoiser, batch, plan, rows)
        loss, stats = trainer.compute_loss(outputs, batch, plan)
        with trainer.gradient_sync(last=True):
            trainer.backward((loss + pad) * plan.scale)
        return _reduced_stats(trainer, stats, plan)
    with torch.no_grad():
        outputs, _ = step_outputs(trainer, trainer.denoiser, batch, plan, rows)
    leaf = outputs.detach().requires_grad_(True)
    loss, stats = trainer.compute_loss(leaf, batch, plan)
    (coef,) = torch.autograd.grad(loss, leaf)
    coef = coef.reshape(-1) * plan.scale
    slots = plan.micro_batches(rows, trainer.config.train_micro_batch_size)
    for i, positions in enumerate(slots):
        if positions is None:
            term = trainer.model_outputs(trainer.denoiser, batch, padding_rows(trainer, batch)).sum() * 0.0
        else:
            term = (trainer.model_outputs(trainer.denoiser, batch, _part(rows, positions)) * coef[positions]).sum()
        with trainer.gradient_sync(last=i == len(slots) - 1):
            trainer.backward(term)
    return _reduced_stats(trainer, stats, plan)


def _reduced_stats(trainer, stats: Dict[str, torch.Tensor], plan: UpdatePlan) -> Dict[str, float]:
    """Global means of per-process sums: each statistic over the step's global loss weight, or over its rows for
    those the trainer lists in `row_stats`."""
    keys = trainer.loss_stats
    sums = torch.stack([stats[key] for key in keys])
    if plan.num_processes > 1:
        sums = trainer.accelerator.reduce(sums, reduction="sum")
    weight, rows = max(plan.global_weight, 1), max(plan.global_rows, 1)
    return {key: value / (rows if key in trainer.row_stats else weight) for key, value in zip(keys, sums.tolist())}
