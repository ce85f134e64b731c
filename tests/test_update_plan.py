"""The planning of optimizer steps across processes (`diffalign.trainers.update_plan`), without a model: every
process plans the same steps from the same permutation, together they cover each chosen unit once, their loss weights
add up to the global one and every process runs as many forwards."""

import pytest
import torch

from diffalign.trainers.update_plan import GlobalLayout, UpdatePlan, local_plan, plan_updates, update_mode


def plans_of_every_process(num_processes, num_local, unit_size, units_per_step, steps=2, micro=3, weight=None):
    layouts = [GlobalLayout(num_local, num_local, num_processes, p) for p in range(num_processes)]
    num_global = layouts[0].num_global
    order = torch.randperm(num_global // unit_size, generator=torch.Generator().manual_seed(0))
    step_plan = torch.arange(num_global * steps).view(num_global, steps) if steps else None
    return layouts, [list(plan_updates(layout, order, unit_size, units_per_step, step_plan, micro, weight,
                                       sorted_samples=unit_size > 1)) for layout in layouts]


@pytest.mark.parametrize("num_processes,unit_size,units_per_step", [(1, 1, 2), (2, 1, 3), (2, 2, 2), (4, 2, 1)])
def test_processes_share_out_each_step_without_overlap(num_processes, unit_size, units_per_step):
    layouts, plans = plans_of_every_process(num_processes, 8, unit_size, units_per_step)
    num_global = layouts[0].num_global
    steps_of_all = [len(p) for p in plans]
    assert len(set(steps_of_all)) == 1  # the same optimizer steps everywhere
    covered = []
    for step in range(steps_of_all[0]):
        parts = [plans[p][step] for p in range(num_processes)]
        assert len({part.slots for part in parts}) == 1  # as many forwards on every process
        assert len({part.global_rows for part in parts}) == 1
        assert sum(part.local_weight for part in parts) == parts[0].global_weight == parts[0].global_rows
        assert sum(part.scale for part in parts) == pytest.approx(num_processes)  # the engine divides by P
        for p, part in enumerate(parts):
            # local indices map back to this process's global samples, and the step plan follows the sample
            local = part.samples
            blocks = local // layouts[p].per_block
            global_index = blocks * layouts[p].global_block + p * layouts[p].per_block + local % layouts[p].per_block
            assert torch.equal(part.steps[:, 0] // 2, global_index)
            covered += global_index.tolist()
            assert len(part.rows("cpu")) == part.samples.shape[0] * 2
    assert sorted(covered) == list(range(num_global))  # every sample once per pass


def test_loss_weight_and_final_sample_rows():
    pairs = lambda units: 3 * int(units.numel())  # noqa: E731  (a stand-in for PRDP's counted pairs)
    _, plans = plans_of_every_process(2, 4, 2, 2, steps=0, weight=pairs)
    for step in zip(*plans):
        assert all(part.steps is None and part.steps_per_sample == 1 for part in step)
        assert step[0].global_weight == 3 * 2 and sum(part.local_weight for part in step) == 6
        rows = step[0].rows("cpu")
        assert rows.steps is None and torch.equal(rows.samples, step[0].samples)


def test_modes_and_a_local_plan():
    assert update_mode("rows", None, 5) == "micro_batch"
    assert update_mode("update", None, 1) == "single_pass" and update_mode("update", None, 2) == "two_pass"
    assert update_mode("update", False, 2) == "single_pass" and update_mode("update", True, 1) == "two_pass"
    plan = local_plan(torch.arange(3), torch.zeros(3, 2, dtype=torch.long), micro_batch_size=4, weight=5)
    assert (plan.global_rows, plan.slots, plan.scale) == (6, 2, 1.0)
    assert plan.micro_batches(plan.rows("cpu"), 4) == [slice(0, 4), slice(4, 6)]
    empty = UpdatePlan(torch.zeros(0, dtype=torch.long), None, 0, 0, 4, 1, 2)
    assert empty.scale == 0.0 and empty.micro_batches(empty.rows("cpu"), 4) == [None]  # a padding forward only
