"""Peak CPU memory (RSS) of full fine-tune steps, per process, for comparing how gradients are synchronised.

Builds an SD1.5-shaped UNet narrowed by `--width` (tiny VAE and text encoder around it), runs one PRDP or DDPO epoch
with `use_lora: false` (every UNet weight trained, frozen reference copy), twice, and samples each process's resident
memory every 2 ms: before the first epoch (weights loaded), the peak of the first epoch (which also allocates Adam's
moments) and of the second (the steady state). Run it on 2 processes:

    MALLOC_MMAP_THRESHOLD_=65536 ACCELERATE_USE_CPU=true OMP_NUM_THREADS=1 accelerate launch --multi_gpu \\
        --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no scripts/full_finetune_memory.py

(`MALLOC_MMAP_THRESHOLD_` makes glibc return freed tensors to the system at once, so that RSS follows the live
tensors; without it freed blocks stay resident and both versions below peak near 4.1 GB.) Prints one JSON line per
process. To measure another version of diffalign, put it first on PYTHONPATH (the line names the `diffalign` it
imported). Measured on a 2-core CPU, `--width 0.4` (a 135M-parameter UNet, 515 MiB per fp32 copy), PRDP, 2 processes:

| gradient sync | peak RSS, first epoch | peak RSS, second epoch |
|---|---|---|
| hand-written flat all-reduce (before issue 16) | 3148 MiB | 3635 MiB |
| DDP-prepared denoiser, gradients as bucket views | 3147 MiB | 3346 MiB (-289 MiB) |
| `--fsdp2`: denoiser and reference sharded over the 2 processes | 1879 MiB | 2394 MiB (-1241 MiB) |
"""

import argparse
import json
import os
import tempfile
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def pipeline(width: float):
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    import diffalign.testing as testing

    torch.manual_seed(0)
    components = testing.tiny_sd_components()
    channels = [max(32, int(round(c * width / 32)) * 32) for c in (320, 640, 1280, 1280)]
    components["unet"] = UNet2DConditionModel(
        sample_size=components["unet"].config.sample_size, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=channels, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=components["text_encoder"].config.hidden_size, attention_head_dim=8, norm_num_groups=32,
    )
    return StableDiffusionPipeline(**components, requires_safety_checker=False)


def fully_sharded(cls):
    """`cls` with torch's FSDP2 `fully_shard` on the denoiser and the frozen reference (the model's
    `_no_split_modules` as units, then the root), applied where accelerate's FSDP plugin would on GPUs."""
    from torch.distributed.fsdp import fully_shard

    def shard(module):
        units = set(getattr(module, "_no_split_modules", None) or [])
        for sub in reversed(list(module.modules())):
            if sub is not module and type(sub).__name__ in units:
                fully_shard(sub)
        fully_shard(module)
        return module

    class Sharded(cls):
        def _prepare_training(self, denoiser, optimizer):
            names = {id(p): n for n, p in denoiser.named_parameters()}
            groups = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
            shard(denoiser)
            params = dict(denoiser.named_parameters())
            for group, group_names in zip(optimizer.param_groups, groups):
                group["params"] = [params[n] for n in group_names]
            return denoiser, self.accelerator.prepare(optimizer)

        def _prepare_reference(self, ref_denoiser):
            return shard(ref_denoiser).eval()

    return Sharded


class PeakRSS:
    def __init__(self, interval: float = 0.002):
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=float, default=0.4, help="channel multiplier of the SD1.5 UNet")
    parser.add_argument("--algorithm", default="prdp", choices=["prdp", "ddpo"])
    parser.add_argument("--fsdp2", action="store_true", help="shard the denoiser and the reference (FSDP2)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    import diffalign
    from diffalign.config import DDPOConfig, PRDPConfig
    from diffalign.trainers import DDPOTrainer, PRDPTrainer

    def brightness(images, prompts, metadata=None):
        return images.float().mean(dim=(1, 2, 3)).cpu()

    out = tempfile.mkdtemp(prefix="ft-memory-")
    common = dict(model="unused", prompts=["a cat", "a dog"], num_epochs=1, sample_num_steps=2,
                  sample_num_prompts_per_epoch=2, sample_images_per_prompt=2, sample_batch_size=2, grid_num_images=1,
                  use_lora=False, train_learning_rate=1e-5, train_micro_batch_size=2, seed=0)
    if args.algorithm == "prdp":
        config = PRDPConfig(**common, output_dir=os.path.join(out, "run"), train_num_inner_epochs=1)
        cls = PRDPTrainer
    else:
        config = DDPOConfig(**common, output_dir=os.path.join(out, "run"), train_batch_size=4)
        cls = DDPOTrainer
    if args.fsdp2:
        cls = fully_sharded(cls)
    pipe = pipeline(args.width)
    params = sum(p.numel() for p in pipe.unet.parameters())
    trainer = cls(config, pipeline=pipe, reward_fn=brightness)
    peaks = []
    for epoch in range(2):  # the first optimizer step also allocates Adam's moments; the second is the steady state
        trainer.accelerator.wait_for_everyone()
        with PeakRSS() as rss:
            before = rss.peak
            trainer.step(epoch)
        peaks.append((before, rss.peak))
    trainer.accelerator.wait_for_everyone()
    (first_before, first_peak), (before, peak) = peaks
    print(json.dumps({
        "diffalign": os.path.dirname(diffalign.__file__), "algorithm": args.algorithm,
        "process": trainer.accelerator.process_index, "processes": trainer.accelerator.num_processes,
        "unet_params_M": round(params / 1e6, 1), "fp32_copy_MiB": round(params * 4 / 2**20),
        "rss_before_MiB": round(first_before / 2**20), "peak_rss_epoch0_MiB": round(first_peak / 2**20),
        "peak_rss_epoch1_MiB": round(peak / 2**20), "epoch1_increase_MiB": round((peak - before) / 2**20),
        "denoiser": type(getattr(trainer, "prepared", trainer.denoiser)).__name__,
    }), flush=True)


if __name__ == "__main__":
    main()
