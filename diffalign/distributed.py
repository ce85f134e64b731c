"""The trainers on accelerate's engines: DDP, FSDP (FSDP2) and DeepSpeed ZeRO.

The denoiser and its optimizer go through `Accelerator.prepare`; everything here is what the trainers need on top of
that, the same for every engine:

- `gradient_sync(accelerator, model, sync)`: one backward of an optimizer step; gradients are reduced across processes
  only in the last one (`no_sync` for DDP, `set_requires_gradient_sync` for FSDP2, DeepSpeed's accumulation boundary).
- `micro_batch_slots` / `max_count`: every process runs the same number of denoiser forwards (sharded engines gather
  parameters in each forward, and DDP reduces in the last backward), padding with zero-weight micro-batches when the
  global batch puts fewer rows on one process than on another.
- `full_parameters` / `optimizer_state` / `load_optimizer_state`: checkpoints of sharded runs are gathered into the
  same single-file format as unsharded ones (parameter names, never rank-local ids), so a checkpoint written by 2
  processes resumes on 1 or on 8, under any engine.
- `prepare_reference`: the frozen reference copy (full fine-tuning) placed per engine, as TRL's GRPO trainer does:
  sharded like the policy under FSDP and ZeRO-3, replicated otherwise.
"""

import contextlib
import logging
import math
from typing import Dict, Iterable, List, Optional

import torch

from .utils.peft_utils import unwrap

logger = logging.getLogger("diffalign")


# ------------------------------------------------------------------------------------------------------ engines
def engine_name(accelerator) -> str:
    """`"single"`, `"ddp"`, `"fsdp"`, `"deepspeed"` (or accelerate's own name for anything else)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return "fsdp"
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    if accelerator.num_processes == 1:
        return "single"
    if kind in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU, DistributedType.MULTI_XPU,
                DistributedType.MULTI_NPU, DistributedType.MULTI_MLU, DistributedType.MULTI_HPU):
        return "ddp"
    return str(kind).lower()


def zero_stage(accelerator) -> int:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return int(plugin.zero_stage) if plugin is not None else 0


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.4
        return None
    return DTensor


def is_dtensor(tensor) -> bool:
    DTensor = _dtensor_type()
    return DTensor is not None and isinstance(tensor, DTensor)


def is_fsdp2(model) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return any(isinstance(m, FSDPModule) for m in _inner(model).modules())


def is_sharded(accelerator, model) -> bool:
    """Whether the parameters of `model` are split across processes (FSDP, ZeRO-3): then every process must take
    part in each forward and in gathering the weights."""
    if engine_name(accelerator) == "deepspeed":
        return zero_stage(accelerator) == 3
    return engine_name(accelerator) == "fsdp" or any(is_dtensor(p) for p in model.parameters())


def _inner(model):
    """The module under torch.compile (DDP, FSDP2 and DeepSpeed modules are kept: they hold the collectives)."""
    return getattr(model, "_orig_mod", model)


def ddp_kwargs():
    """accelerate's DDP settings for the trainers: no buffer broadcast in forward (ranks may run different numbers of
    no-grad forwards) and gradients as views of the reduction buckets (no second copy of the gradients)."""
    from accelerate import DistributedDataParallelKwargs

    return DistributedDataParallelKwargs(broadcast_buffers=False, gradient_as_bucket_view=True)


@contextlib.contextmanager
def gradient_sync(accelerator, model, sync: bool):
    """Context for one backward of an optimizer step: gradients are reduced across processes only when `sync` (the
    last backward of the step); the others accumulate locally. Every process must use the same sequence."""
    accelerator.gradient_state._set_sync_gradients(sync)  # DeepSpeed's accumulation boundary; AcceleratedOptimizer
    try:
        if sync or accelerator.num_processes == 1:
            yield
        elif is_fsdp2(model) and not getattr(accelerator, "is_fsdp2", False):
            # FSDP2 applied outside accelerate (torch's fully_shard): the same switch accelerate's no_sync flips
            inner = _inner(model)
            inner.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                inner.set_requires_gradient_sync(True)
        else:
            with accelerator.no_sync(_inner(model)):
                yield
    finally:
        accelerator.gradient_state._set_sync_gradients(True)


# ------------------------------------------------------------------------------------------ balanced forwards
def micro_batch_count(rows: int, micro_batch_size: int) -> int:
    return math.ceil(rows / micro_batch_size) if rows > 0 else 0


def max_count(counts: Iterable[int]) -> int:
    """The number of forwards every process runs (at least one, so that each optimizer step has a backward to sync
    in)."""
    return max(1, max(counts))


def micro_batch_slots(rows: int, micro_batch_size: int, slots: int) -> List[Optional[slice]]:
    """`slots` micro-batches over `rows` rows: slices, then `None` for the padding ones (a zero-weight forward)."""
    out: List[Optional[slice]] = [slice(s, min(s + micro_batch_size, rows)) for s in range(0, rows, micro_batch_size)]
    if len(out) > slots:
        raise ValueError(f"{len(out)} micro-batches do not fit in {slots} slots")
    return out + [None] * (slots - len(out))


# ------------------------------------------------------------------------------------------- gathered states
def _named_trainables(model) -> Dict[str, torch.nn.Parameter]:
    return {n: p for n, p in unwrap(model).named_parameters()}


def full_parameters(accelerator, model, names: Optional[Iterable[str]] = None,
                    buffers: bool = False) -> Dict[str, torch.Tensor]:
    """The full (unsharded) values of the parameters `names` of `model` (all by default, plus the buffers with
    `buffers`), on the main process, on the CPU for sharded models; `{}` elsewhere. Collective when the model is
    sharded: call it on every process."""
    main = accelerator.is_main_process
    if engine_name(accelerator) == "deepspeed":
        state = accelerator.get_state_dict(model, unwrap=True)  # gathers ZeRO-3 partitions (collective)
        if not main:
            return {}
        wanted = set(names) if names is not None else None
        return {k: v for k, v in state.items() if wanted is None or k in wanted}
    module = unwrap(model)
    params = dict(module.named_parameters())
    selected = list(names) if names is not None else list(params)
    out = {}
    for name in selected:  # the same order on every process: one gather per sharded tensor
        value = params[name].detach()
        if is_dtensor(value):
            value = value.full_tensor()
            if main:
                out[name] = value.cpu()
        elif main:
            out[name] = value
    if buffers and main:
        out.update({n: b.detach() for n, b in module.named_buffers()})
    return out


@contextlib.contextmanager
def full_state_dict_view(module, state: Dict[str, torch.Tensor]):
    """Makes `module.state_dict()` return `state` (its full values) for the duration, so diffusers' `save_pretrained`
    and peft's state-dict helpers write a sharded model's gathered weights. Main process only."""
    keys = list(module.state_dict().keys())
    view = {k: state[k] for k in keys if k in state}
    module.state_dict = lambda *args, **kwargs: dict(view)
    try:
        yield
    finally:
        del module.state_dict


def _plain_optimizer(optimizer):
    from accelerate.optimizer import AcceleratedOptimizer

    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


def optimizer_state(accelerator, model, optimizer) -> Optional[dict]:
    """The optimizer's state keyed by parameter names, with full (gathered) tensors, on the main process (`{}`
    elsewhere; `None` under DeepSpeed, whose partitioned optimizer is not saved): the same format for every engine
    and process count. Collective when the model is sharded."""
    if engine_name(accelerator) == "deepspeed":
        return None
    opt = _plain_optimizer(optimizer)
    names = {id(p): n for n, p in _named_trainables(model).items()}
    main = accelerator.is_main_process
    state, groups = {}, []
    for group in opt.param_groups:
        settings = {k: v for k, v in group.items() if k != "params"}
        groups.append({**settings, "params": [names[id(p)] for p in group["params"]]})
        for p in group["params"]:
            entry = {}
            for key, value in sorted(opt.state.get(p, {}).items()):
                if isinstance(value, torch.Tensor):
                    value = value.detach()
                    if is_dtensor(value):
                        value = value.full_tensor().cpu()
                if main:
                    entry[key] = value
            if main and entry:
                state[names[id(p)]] = entry
    return {"state": state, "param_groups": groups} if main else {}


def load_optimizer_state(accelerator, model, optimizer, saved: dict):
    """Loads a state written by `optimizer_state` (or a plain `optimizer.state_dict()` of an older checkpoint): each
    process takes its shard of the full tensors."""
    opt = _plain_optimizer(optimizer)
    if saved.get("state") and all(isinstance(k, int) for k in saved["state"]):  # id-keyed (before names)
        optimizer.load_state_dict(saved)
        return
    params = _named_trainables(model)
    order = [p for group in opt.param_groups for p in group["params"]]
    index = {id(p): i for i, p in enumerate(order)}
    if len(saved["param_groups"]) != len(opt.param_groups):
        raise ValueError(f"the checkpoint's optimizer has {len(saved['param_groups'])} parameter groups, this run "
                         f"{len(opt.param_groups)}")
    groups = []
    for saved_group, group in zip(saved["param_groups"], opt.param_groups):
        ids = [index[id(params[name])] for name in saved_group["params"]]
        if sorted(ids) != sorted(index[id(p)] for p in group["params"]):
            raise ValueError("the checkpoint's optimizer holds other parameters than this run's")
        groups.append({**saved_group, "params": ids})
    state = {}
    for name, entry in saved["state"].items():
        param = params[name]
        converted = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and is_dtensor(param) and value.shape == param.shape:
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements,
                                          src_data_rank=None)  # every process holds the full value: no transfer
            converted[key] = value
        state[index[id(param)]] = converted
    opt.load_state_dict({"state": state, "param_groups": groups})


# ------------------------------------------------------------------------------------------------- placement
def prepare_reference(accelerator, module):
    """The frozen reference denoiser (full fine-tuning) placed for the engine, in eval mode: sharded like the policy
    under FSDP (FSDP2) and DeepSpeed ZeRO-3, replicated on each process otherwise (TRL's GRPO trainer does the
    same)."""
    name = engine_name(accelerator)
    if name == "fsdp" and getattr(accelerator, "is_fsdp2", False):
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        return fsdp2_prepare_model(accelerator, module).eval()
    if name == "fsdp":
        return accelerator.prepare_model(module, evaluation_mode=True).eval()
    if name == "deepspeed" and zero_stage(accelerator) == 3:
        import copy

        import deepspeed

        config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
        for key in ("optimizer", "scheduler"):
            config.pop(key, None)
        config["train_micro_batch_size_per_gpu"] = 1
        config.pop("train_batch_size", None)
        engine, *_ = deepspeed.initialize(model=module, config=config)
        return engine.eval()
    return module.to(accelerator.device).eval()
