"""`bench rlg`: RLG sampling (single/two pass, windows) against the family's plain pipeline, for every family with an
RLG pipeline; for families whose diffusers modular blocks take a guider (SDXL, SD3, Z-Image) also the RLG guider in the
modular pipeline against the model's own CFG guider (the only RLG route of a family without an RLG pipeline). An
editing model (FLUX.1 Kontext, Qwen-Image-Edit) edits the bench's condition images (`Context.condition_images`) in
every case; a pipeline that takes one prompt a call with its images (Qwen-Image-Edit) is called once per prompt."""

from .common import (
    BenchError,
    Figures,
    PeakMemory,
    mib,
    paired_ratio,
    pipeline_condition,
    prompt_batches,
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
def add_random_lora(denoiser, std: float = 0.1, seed: int = 0, adapter_name: str = "default"):
    """A peft LoRA (rank 4, attention projections) with random non-zero B weights, so it changes the model."""
    import torch
    from peft import LoraConfig

    denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name=adapter_name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in denoiser.named_parameters():
            if f"lora_B.{adapter_name}." in name:
                param.copy_((std * torch.randn(param.shape, generator=generator)).to(param.device, param.dtype))
    return denoiser


# `rlg` with a modular pipeline: (name, start, stop) of the RLG guider, against the model's own CFG guider
GUIDER_CASES = [("guider_0_1", 0.0, 1.0), ("guider_0_0.5", 0.0, 0.5)]


def guider_blocks(family):
    """The family's diffusers modular blocks class when its blocks take a `guider` component (where the RLG guider
    plugs in), else None (`ModelFamily.modular_blocks`)."""
    blocks = family.modular_blocks()
    return None if blocks is None else type(blocks)


def run_benchmark(ctx) -> dict:
    """RLG sampling against plain sampling of the same (LoRA) model, for the model's family (e.g. `--model DIR` with
    an SD3, FLUX or Z-Image directory): the family's RLG pipeline (single/two pass, windows) where it has one, and
    where the family's modular blocks take a guider, the RLG guider in the modular pipeline against the model's own
    CFG guider (`ModelFamily.modular_cfg_guider`). A family whose RLG route is the modular guider (Z-Image) has the
    guider cases only."""
    import diffusers
    import torch

    import diffalign.pipelines
    from diffalign.families import family_for_pipeline

    args = ctx.args
    base = ctx.pipeline(copy_=not args.sd15_random)
    family = family_for_pipeline(base)
    if family.rlg_route() is None:
        raise BenchError(f"rlg: the {family.pipeline_class} family has no RLG pipeline and no modular blocks that"
                         " take a guider")
    denoiser = getattr(base, family.denoiser_name)
    add_random_lora(denoiser, args.lora_std, args.seed)
    denoiser.to(ctx.device, ctx.dtype).eval()
    components = {k: v for k, v in base.components.items() if not k.startswith("aligned_")}
    init = {**family.pipeline_init_kwargs, **components}  # no safety checker, no watermarker
    plain = getattr(diffusers, family.pipeline_class)(**init)
    plain.set_progress_bar_config(disable=True)
    rlg_cases = RLG_CASES if family.rlg_pipeline_class else []
    if rlg_cases:
        rlg = getattr(diffalign.pipelines, family.rlg_pipeline_class)(**init)
        rlg.set_progress_bar_config(disable=True)
    steps, g, batch = ctx.steps, ctx.guidance_scale, ctx.batch_size
    if family.guidance_kind != "embedded" and g <= 1:
        raise BenchError("rlg compares against CFG sampling: use --guidance-scale > 1")
    res = ctx.resolution(base)
    prompts = ctx.prompts(batch)
    batches = prompt_batches(plain, prompts)  # the prompts of each call (one call, or one per prompt)
    ctx.settings.update(model=ctx.model_name, family=family.name, rlg_route=family.rlg_route(), batch_size=batch,
                        steps=steps, guidance_scale=g, resolution=res, rlg_scale=args.rlg_scale,
                        lora_std=args.lora_std, repeats=ctx.repeats, calls_per_batch=len(batches),
                        cases={n: {"rlg_single_pass": s, "rlg_start": a, "rlg_stop": b} for n, s, a, b in rlg_cases})
    # `g` is the RLG pipelines' `guidance_scale`: CFG, or the embedded guidance of a guidance-distilled model; the
    # guider route samples as the family's pipeline with CFG scale `g` (e.g. ZImagePipeline's `g - 1`)
    guidance = {"guidance_scale": g} if family.rlg_pipeline_class else family.pipeline_guidance_kwargs(g)
    common = dict(num_inference_steps=steps, height=res, width=res, output_type="pt", **guidance)
    # e.g. the same T5 length in every case; FLUX.1 Kontext's output area at the sampled size
    common.update(family.pipeline_call_kwargs(res, res))
    common.update(pipeline_condition(family, prompts[0], res, res))  # every prompt has the same condition images

    def generator():
        return torch.Generator(ctx.device).manual_seed(args.seed)

    def each_call(pipe, **kwargs):
        """`pipe` on every call's prompts: a fresh list per call (some pipelines write the chat-templated prompts
        into the list they get: Z-Image's), `prompt=` by name (Flux2KleinPipeline's first argument is `image`), a
        negative prompt per prompt where the call has one."""
        def call():
            for texts in batches:
                extra = {}
                if isinstance(kwargs.get("negative_prompt"), list):
                    extra["negative_prompt"] = kwargs["negative_prompt"][: len(texts)]
                pipe(prompt=list(texts), generator=generator(), **{**kwargs, **extra})
        return call

    fns = {"plain": each_call(plain, **common)}
    for name, single, start, stop in rlg_cases:
        fns[name] = each_call(rlg, rlg_scale=args.rlg_scale, rlg_start=start, rlg_stop=stop, rlg_single_pass=single,
                              **common)

    blocks = guider_blocks(family)
    guider_cases = GUIDER_CASES if blocks is not None else []
    if guider_cases:
        # the same components in the family's modular pipeline, one pipeline per guider
        from diffalign.guiders import ReinforcementLearningGuidance, set_modular_progress_bar_config

        modular_kwargs = {k: v for k, v in common.items() if k not in ("guidance_scale", "true_cfg_scale")}
        # an explicit empty negative prompt: some blocks (SD3's) run CFG only with one
        modular_kwargs["negative_prompt"] = [""] * len(prompts)
        # the pipeline's CFG argument (Qwen-Image's guidance has no `guidance_scale`)
        cfg_scale = guidance["true_cfg_scale"] if "true_cfg_scale" in guidance else guidance["guidance_scale"]

        def cfg_guider():  # for this model (a step-distilled FLUX.2 klein: CFG off)
            return family.modular_cfg_guider_for(plain)(cfg_scale)

        def modular(guider):
            pipe = blocks().init_pipeline()
            pipe.update_components(**{k: v for k, v in components.items() if v is not None}, guider=guider)
            set_modular_progress_bar_config(pipe, disable=True)
            output = "videos" if family.output_kind == "video" else "images"  # a video model's blocks: "videos"
            return each_call(pipe, output=output, **modular_kwargs)

        fns["guider_cfg"] = modular(cfg_guider())
        for name, start, stop in guider_cases:
            fns[name] = modular(ReinforcementLearningGuidance.from_cfg_guider(
                cfg_guider(), rlg_scale=args.rlg_scale, start=start, stop=stop))
        ctx.settings["guider_cases"] = {n: {"start": a, "stop": b} for n, a, b in guider_cases}

    meter = PeakMemory(ctx.device)
    timings = timed_interleaved(fns, ctx.repeats, ctx.device, meter)
    figures = Figures()
    figures.add("plain_images_per_s", batch / timings["plain"]["median"], "img/s")
    for name, _, start, stop in rlg_cases:
        figures.add(f"rlg_{name}_over_plain", paired_ratio(timings[name], timings["plain"])["ratio"],
                    f"time ratio, RLG in steps [{start}, {stop}) (2 denoiser passes: ~{1 + (stop - start):.2g})")
    if guider_cases:
        figures.add("guider_cfg_images_per_s", batch / timings["guider_cfg"]["median"], "img/s")
        for name, start, stop in guider_cases:
            figures.add(f"rlg_{name}_over_guider_cfg", paired_ratio(timings[name], timings["guider_cfg"])["ratio"],
                        f"time ratio, RLG guider in steps [{start}, {stop}) vs the CFG guider"
                        f" (~{1 + (stop - start):.2g})")
    figures.add("plain_peak_mem_mib", mib(timings["plain"]["peak_bytes"]), meter.kind)
    for name, *_ in rlg_cases:
        figures.add(f"rlg_{name}_peak_mem_mib", mib(timings[name]["peak_bytes"]), meter.kind)
    if not rlg_cases:  # the guider route: its memory instead
        for name, *_ in guider_cases:
            figures.add(f"rlg_{name}_peak_mem_mib", mib(timings[name]["peak_bytes"]), meter.kind)
    return {"figures": figures, "timings": timings}
