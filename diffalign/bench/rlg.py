"""`bench rlg`: RLG sampling (single/two pass, windows) against plain CFG sampling."""



from .common import (
    BenchError,
    Figures,
    PeakMemory,
    mib,
    paired_ratio,
    timed_interleaved,
)


# `rlg`: (name, rlg_single_pass, rlg_start, rlg_stop)
RLG_CASES = [
    ("single_pass_0_1", True, 0.0, 1.0),
    ("two_pass_0_1", False, 0.0, 1.0),
    ("single_pass_0_0.5", True, 0.0, 0.5),
    ("single_pass_0.5_1", True, 0.5, 1.0),
    ("two_pass_0_0.5", False, 0.0, 0.5),
    ("two_pass_0.5_1", False, 0.5, 1.0),
]


# -------------------------------------------------------------------------------------------------------- rlg
def add_random_lora(unet, std: float = 0.1, seed: int = 0, adapter_name: str = "default"):
    """A peft LoRA (rank 4, attention projections) with random non-zero B weights, so it changes the model."""
    import torch
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name=adapter_name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if f"lora_B.{adapter_name}." in name:
                param.copy_((std * torch.randn(param.shape, generator=generator)).to(param.device, param.dtype))
    return unet


def run_benchmark(ctx) -> dict:
    import torch
    from diffusers import StableDiffusionPipeline

    from diffalign.pipelines import StableDiffusionRLGPipeline

    args = ctx.args
    base = ctx.pipeline(copy_=not args.sd15_random)
    add_random_lora(base.unet, args.lora_std, args.seed)
    base.unet.to(ctx.device, ctx.dtype).eval()
    components = {k: v for k, v in base.components.items()}
    rlg = StableDiffusionRLGPipeline(**components, requires_safety_checker=False)
    plain = StableDiffusionPipeline(**{k: v for k, v in components.items() if k != "aligned_unet"},
                                    requires_safety_checker=False)
    for p in (rlg, plain):
        p.set_progress_bar_config(disable=True)
    steps, g, batch = ctx.steps, ctx.guidance_scale, ctx.batch_size
    if g <= 1:
        raise BenchError("rlg compares against CFG sampling: use --guidance-scale > 1")
    res = ctx.resolution(base)
    prompts = ctx.prompts(batch)
    ctx.settings.update(model=ctx.model_name, batch_size=batch, steps=steps, guidance_scale=g, resolution=res,
                        rlg_scale=args.rlg_scale, lora_std=args.lora_std, repeats=ctx.repeats,
                        cases={n: {"rlg_single_pass": s, "rlg_start": a, "rlg_stop": b} for n, s, a, b in RLG_CASES})
    common = dict(num_inference_steps=steps, guidance_scale=g, height=res, width=res, output_type="pt")

    def generator():
        return torch.Generator(ctx.device).manual_seed(args.seed)

    fns = {"plain": lambda: plain(prompts, generator=generator(), **common)}
    for name, single, start, stop in RLG_CASES:
        fns[name] = (lambda single=single, start=start, stop=stop: rlg(
            prompts, generator=generator(), rlg_scale=args.rlg_scale, rlg_start=start, rlg_stop=stop,
            rlg_single_pass=single, **common))
    meter = PeakMemory(ctx.device)
    timings = timed_interleaved(fns, ctx.repeats, ctx.device, meter)
    figures = Figures()
    figures.add("plain_images_per_s", batch / timings["plain"]["median"], "img/s")
    for name, _, start, stop in RLG_CASES:
        figures.add(f"rlg_{name}_over_plain", paired_ratio(timings[name], timings["plain"])["ratio"],
                    f"time ratio, RLG in steps [{start}, {stop}) (2 UNet passes: ~{1 + (stop - start):.2g})")
    figures.add("plain_peak_mem_mib", mib(timings["plain"]["peak_bytes"]), meter.kind)
    for name, *_ in RLG_CASES:
        figures.add(f"rlg_{name}_peak_mem_mib", mib(timings[name]["peak_bytes"]), meter.kind)
    return {"figures": figures, "timings": timings}

