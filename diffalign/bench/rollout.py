"""`bench rollout`: trajectories with log-probs against the family's plain pipeline. An editing or image-to-video
model's prompts carry the bench's condition images (`Context.condition_images`) on both sides; a pipeline that takes
one prompt a call with its images (Qwen-Image-Edit) is called once per prompt (`prompt_batches`)."""

import contextlib
import time
from typing import Dict


from .common import (
    Figures,
    PeakMemory,
    median,
    mib,
    paired_ratio,
    pipeline_condition,
    prompt_batches,
    sync,
    timed_interleaved,
)


# ---------------------------------------------------------------------------------------------------- rollout
def run_benchmark(ctx) -> dict:
    import torch

    from diffalign.families import family_for_pipeline
    from diffalign.rollout import sample_trajectories

    pipe = ctx.pipeline(copy_=False)
    family = family_for_pipeline(pipe)
    # the stock pipeline's own noise argument: DDIM's eta for UNet families (flow pipelines sample the ODE)
    noise = {"eta": 1.0} if family.kernel_class.name == "ddim" else {}
    steps, g, batch = ctx.steps, ctx.guidance_scale, ctx.batch_size
    res = ctx.resolution(pipe)
    prompts = ctx.prompts(batch)
    batches = prompt_batches(pipe, prompts)
    ctx.settings.update(model=ctx.model_name, batch_size=batch, steps=steps, guidance_scale=g, eta=1.0,
                        resolution=res, repeats=ctx.repeats, plain_calls_per_batch=len(batches))
    device = ctx.device

    def ours():
        generator = torch.Generator(device).manual_seed(ctx.args.seed)
        sample_trajectories(family, prompts, steps, g, eta=1.0, height=res, width=res, generator=generator)

    guidance = family.pipeline_guidance_kwargs(g, family.embedded_guidance)
    negative = guidance.pop("negative_prompt", None)  # true CFG: one per prompt (QwenImage21Pipeline needs as many)
    condition = pipeline_condition(family, prompts[0], res, res)  # every prompt has the same images

    def plain():
        generator = torch.Generator(device).manual_seed(ctx.args.seed)
        for texts in batches:
            negatives = {} if negative is None else {"negative_prompt": [negative] * len(texts)}
            pipe(prompt=list(texts), num_inference_steps=steps, height=res, width=res, generator=generator,
                 output_type="pt", **guidance, **negatives, **condition, **family.pipeline_call_kwargs(res, res),
                 **noise)

    meter = PeakMemory(device)
    timings = timed_interleaved({"ours": ours, "plain": plain}, ctx.repeats, device, meter)
    # where the difference goes: the same calls again, with the time inside UNet forwards and VAE decodes measured
    outside = {"ours": [], "plain": []}
    with _module_timer([family.denoiser, pipe.vae.decoder], device) as inside:
        for r in range(ctx.repeats):
            for name, fn in (("ours", ours), ("plain", plain))[:: 1 if r % 2 == 0 else -1]:
                inside.clear()
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
                outside[name].append(time.perf_counter() - start - sum(inside.values()))
    figures = Figures()
    figures.add("rollout_images_per_s", batch / timings["ours"]["median"], "img/s")
    figures.add("plain_images_per_s", batch / timings["plain"]["median"], "img/s")
    r = paired_ratio(timings["ours"], timings["plain"])
    figures.add("rollout_time_ratio", r["ratio"], "ours/plain, medians (target <= 1.02)")
    figures.add("rollout_time_ratio_min", r["ratio_min"], "ours/plain, minima")
    figures.add("rollout_outside_unet_vae_s", median(outside["ours"]), "s per call outside UNet/VAE (median)")
    figures.add("plain_outside_unet_vae_s", median(outside["plain"]), "s per call outside UNet/VAE (median)")
    figures.add("rollout_peak_mem_mib", mib(timings["ours"]["peak_bytes"]), meter.kind)
    figures.add("plain_peak_mem_mib", mib(timings["plain"]["peak_bytes"]), meter.kind)
    return {"figures": figures, "timings": timings, "outside_unet_vae": outside}


@contextlib.contextmanager
def _module_timer(modules, device):
    """`{module index: seconds}` spent inside the forwards of `modules` (clear it between measurements)."""
    totals: Dict[int, float] = {}
    starts = {}

    def pre(index):
        def hook(module, args):
            sync(device)
            starts[index] = time.perf_counter()
        return hook

    def post(index):
        def hook(module, args, output):
            sync(device)
            totals[index] = totals.get(index, 0.0) + time.perf_counter() - starts.pop(index)
        return hook

    handles = []
    for i, m in enumerate(modules):
        handles += [m.register_forward_pre_hook(pre(i)), m.register_forward_hook(post(i))]
    try:
        yield totals
    finally:
        for h in handles:
            h.remove()


