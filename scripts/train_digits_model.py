"""Trains the bundled digits text-to-image model (`diffalign/models/digits`) and its reward classifier.

A tiny Stable-Diffusion-style latent diffusion model, trained from scratch on scikit-learn's
`load_digits` (1797 grey 8x8 digits, bilinear-upsampled to 16x16, bright ink on dark, replicated to
RGB), saved in the stock diffusers `StableDiffusionPipeline` format:

* `vae`: `AutoencoderKL` (3 channels, 2 blocks, vae_scale_factor 2: 16x16 images <-> 4x8x8 latents),
  trained first (reconstruction + small KL); `scaling_factor` is set so latents have unit variance.
* `text_encoder`: a small `CLIPTextModel` (hidden 32, 2 layers, CLIP's 49408-token vocabulary,
  16 positions), trained jointly with the UNet from a random init (a frozen random encoder gave weak
  conditioning: 68% judge accuracy at CFG 2); `tokenizer`:
  `diffalign.tokenization.offline_clip_tokenizer(16)`.
* `unet`: `UNet2DConditionModel` (cross-attention dim 32), epsilon prediction, EMA weights (UNet and
  text encoder); prompts in
  8 phrasings per digit (`diffalign.rewards.digits.PROMPT_TEMPLATES`), 10% empty-prompt dropout so
  classifier-free guidance works.
* `scheduler`: `DDIMScheduler` (1000 steps, squaredcos_cap_v2, steps_offset 1, set_alpha_to_one False,
  clip_sample False).
* `classifier/`: the reward CNN of `diffalign.rewards.digits` (safetensors + config.json), 16x16 grey.

Weights are stored in fp16 safetensors to keep the package small (8.8 MB); diffusers models load them
as fp32 by default, and the text encoder's config says `"dtype": "float32"` so transformers' default
`dtype="auto"` upcasts it too (`StableDiffusionPipeline.from_pretrained(path)` gives an all-fp32
pipeline that runs on a CPU). The tokenizer is stored as vocab.json + merges.txt (1.5 MB, no
tokenizer.json).

Exact command that produced the committed weights (2 CPU cores, torch 2.13 CPU)::

    HF_HUB_OFFLINE=1 python scripts/train_digits_model.py --output diffalign/models/digits

Measured wall time of the committed run: 24.8 min on the shared 2-core machine (1 torch thread, load
average 4-5 from other jobs): VAE 4.8 min, UNet + text encoder 19.7 min, classifier 13 s. With
other jobs on the cores, 2 torch threads were 5x slower than 1 (hence `--threads 1`). Everything is seeded, but CPU kernels are not bit-reproducible
across machines.
"""

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from diffalign.rewards.digits import (  # noqa: E402
    PROMPT_TEMPLATES,
    DigitClassifier,
    digit_prompt,
    load_digit_images,
    save_classifier,
)
from diffalign.testing import tiny_clip_text_kwargs  # noqa: E402
from diffalign.tokenization import offline_clip_tokenizer  # noqa: E402


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_text_encoder(seed, max_length):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        **tiny_clip_text_kwargs(intermediate_size=64, max_position_embeddings=max_length, projection_dim=32)
    )
    return CLIPTextModel(config)


def build_vae(resolution):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=resolution,
    )


def build_unet(latent_size, cross_attention_dim):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def lr_at(step, total, base, warmup=100):
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_vae(images, args):
    vae = build_vae(args.resolution)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    t0, running = time.time(), []
    for step in range(args.vae_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.vae_steps, args.vae_lr)
        idx = torch.randint(0, len(images), (args.batch_size,), generator=gen)
        x = images[idx].repeat(1, 3, 1, 1) * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        rec = F.mse_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec + args.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        running.append((rec.item(), kl.item()))
        if (step + 1) % 100 == 0 or step + 1 == args.vae_steps:
            r = torch.tensor(running[-100:]).mean(0)
            log(f"vae step {step + 1}/{args.vae_steps} mse {r[0]:.5f} kl/px {r[1]:.4f} ({time.time() - t0:.0f}s)")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_all(vae, images, batch=256):
    means, stds = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(images[i : i + batch].repeat(1, 3, 1, 1) * 2 - 1).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def prompt_ids(tokenizer):
    """Token ids `[10, T, L]` of every training prompt (T phrasings per digit) and `[L]` of the empty prompt."""
    prompts = [digit_prompt(d, t) for d in range(10) for t in range(len(PROMPT_TEMPLATES))] + [""]
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids[:-1].reshape(10, len(PROMPT_TEMPLATES), -1), ids[-1]


def train_unet(latent_mean, latent_std, labels, text_encoder, cond_ids, uncond_ids, scheduler, args):
    """Trains the UNet and the text encoder jointly; returns their EMA copies."""
    unet = build_unet(latent_mean.shape[-1], text_encoder.config.hidden_size)
    text_encoder.train().requires_grad_(True)
    models = (unet, text_encoder)
    emas = [copy.deepcopy(m).eval().requires_grad_(False) for m in models]
    log(f"unet params {sum(p.numel() for p in unet.parameters()) / 1e6:.3f} M, text encoder params "
        f"{sum(p.numel() for p in text_encoder.parameters()) / 1e6:.3f} M")
    unet.train()
    # No weight decay on the text encoder: rows of unused tokens then stay exactly as initialised.
    opt = torch.optim.AdamW([{"params": unet.parameters(), "weight_decay": 1e-4},
                             {"params": text_encoder.parameters(), "weight_decay": 0.0}], lr=args.unet_lr)
    gen = torch.Generator().manual_seed(args.seed + 1)
    alphas = scheduler.alphas_cumprod
    t0, running = time.time(), []
    for step in range(args.unet_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.unet_steps, args.unet_lr)
        idx = torch.randint(0, len(labels), (args.batch_size,), generator=gen)
        z0 = latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=gen)
        z0 = z0 * args.scaling_factor
        phrasing = torch.randint(0, cond_ids.shape[1], (args.batch_size,), generator=gen)
        ids = cond_ids[labels[idx], phrasing]
        drop = torch.rand(args.batch_size, generator=gen) < args.uncond_prob
        ids = torch.where(drop[:, None], uncond_ids[None], ids)
        enc = text_encoder(ids)[0]
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch_size,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        pred = unet(zt, t, encoder_hidden_states=enc).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for m in models for p in m.parameters()], 1.0)
        opt.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, model in zip(emas, models):
                for pe, p in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(p, 1 - decay)
        running.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == args.unet_steps:
            log(f"unet step {step + 1}/{args.unet_steps} loss {sum(running[-100:]) / len(running[-100:]):.4f} "
                f"({time.time() - t0:.0f}s)")
    return emas


def augment(x, gen, max_shift=3, noise=0.05):
    """Random translations (zero padding), contrast and Gaussian noise, for the classifier."""
    b, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p))
    dx = torch.randint(0, 2 * p + 1, (b,), generator=gen)
    dy = torch.randint(0, 2 * p + 1, (b,), generator=gen)
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])
    gain = 0.7 + 0.5 * torch.rand(b, 1, 1, 1, generator=gen)
    out = out * gain + noise * torch.rand(b, 1, 1, 1, generator=gen) * torch.randn(out.shape, generator=gen)
    return out.clamp(0, 1)


def train_classifier(images, labels, args):
    gen = torch.Generator().manual_seed(args.seed + 2)
    perm = torch.randperm(len(labels), generator=gen)
    n_val = len(labels) // 10
    val, tr = perm[:n_val], perm[n_val:]
    torch.manual_seed(args.seed + 2)
    model = DigitClassifier(args.resolution)
    opt = torch.optim.AdamW(model.parameters(), lr=args.classifier_lr, weight_decay=1e-4)
    t0 = time.time()
    for step in range(args.classifier_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.classifier_steps, args.classifier_lr, warmup=50)
        model.train()
        idx = tr[torch.randint(0, len(tr), (args.batch_size,), generator=gen)]
        loss = F.cross_entropy(model(augment(images[idx], gen)), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 200 == 0 or step + 1 == args.classifier_steps:
            model.eval()
            with torch.no_grad():
                acc = (model(images[val]).argmax(-1) == labels[val]).float().mean().item()
            log(f"classifier step {step + 1}/{args.classifier_steps} loss {loss.item():.4f} val acc {acc:.4f} "
                f"({time.time() - t0:.0f}s)")
    return model.eval(), acc, n_val


def save_pipeline(vae, text_encoder, tokenizer, unet, scheduler, output, fp16):
    from diffusers import StableDiffusionPipeline

    from diffalign.tokenization import write_clip_vocab

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    if fp16:
        pipe.to(torch.float16)
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        shutil.rmtree(os.path.join(output, sub), ignore_errors=True)
    pipe.save_pretrained(output, safe_serialization=True)
    # Text encoder: fp16 weights, but load as fp32 by default (transformers' dtype="auto" reads this).
    te_config = os.path.join(output, "text_encoder", "config.json")
    with open(te_config) as f:
        config = json.load(f)
    config["dtype"] = "float32"
    with open(te_config, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    # Tokenizer: vocab.json + merges.txt (1.5 MB) instead of tokenizer.json (3.6 MB); same ids.
    tok_dir = os.path.join(output, "tokenizer")
    os.remove(os.path.join(tok_dir, "tokenizer.json"))
    write_clip_vocab(tok_dir)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=os.path.join(REPO, "diffalign", "models", "digits"))
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=16, help="tokenizer/text encoder positions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--vae-steps", type=int, default=500)
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--vae-kl-weight", type=float, default=1e-3, help="weight of KL per pixel")
    parser.add_argument("--unet-steps", type=int, default=2500)
    parser.add_argument("--unet-lr", type=float, default=1e-3)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--uncond-prob", type=float, default=0.1)
    parser.add_argument("--classifier-steps", type=int, default=800)
    parser.add_argument("--classifier-lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is much faster when other processes share the cores)")
    parser.add_argument("--fp32", action="store_true", help="store fp32 weights (default fp16)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["classifier"], help="parts not to train")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    t_start = time.time()
    images, labels = load_digit_images(args.resolution)
    log(f"data {tuple(images.shape)} -> {args.output}")

    tokenizer = offline_clip_tokenizer(model_max_length=args.max_length)
    text_encoder = build_text_encoder(args.seed, args.max_length)
    cond_ids, uncond_ids = prompt_ids(tokenizer)

    t0 = time.time()
    torch.manual_seed(args.seed)
    vae = train_vae(images, args)
    mean, std = encode_all(vae, images)
    sample_std = (mean.var() + std.pow(2).mean()).sqrt().item()
    args.scaling_factor = 1.0 / sample_std
    vae.register_to_config(scaling_factor=args.scaling_factor)
    with torch.no_grad():
        recon = vae.decode(mean[:256]).sample
        mse = F.mse_loss((recon / 2 + 0.5).clamp(0, 1), images[:256].repeat(1, 3, 1, 1)).item()
    t_vae = time.time() - t0
    log(f"vae done in {t_vae:.0f}s: recon mse {mse:.5f}, latent std {sample_std:.4f}, "
        f"scaling_factor {args.scaling_factor:.4f}")

    t0 = time.time()
    scheduler = build_scheduler()
    torch.manual_seed(args.seed + 1)
    unet, text_encoder = train_unet(mean, std, labels, text_encoder, cond_ids, uncond_ids, scheduler, args)
    t_unet = time.time() - t0
    log(f"unet done in {t_unet:.0f}s")

    os.makedirs(args.output, exist_ok=True)
    save_pipeline(vae, text_encoder, tokenizer, unet, scheduler, args.output, fp16=not args.fp32)

    t_cls = 0.0
    if "classifier" not in args.skip:
        t0 = time.time()
        classifier, acc, n_val = train_classifier(images, labels, args)
        t_cls = time.time() - t0
        save_classifier(classifier, os.path.join(args.output, "classifier"),
                        val_accuracy=round(acc, 4), val_images=n_val, train_steps=args.classifier_steps,
                        seed=args.seed)
        log(f"classifier done in {t_cls:.0f}s, val acc {acc:.4f}")

    info = {
        "command": "python " + " ".join(sys.argv),
        "resolution": args.resolution,
        "vae_steps": args.vae_steps,
        "unet_steps": args.unet_steps,
        "classifier_steps": args.classifier_steps,
        "vae_recon_mse": round(mse, 6),
        "scaling_factor": args.scaling_factor,
        "seconds": {"vae": round(t_vae), "unet": round(t_unet), "classifier": round(t_cls),
                    "total": round(time.time() - t_start)},
        "threads": args.threads,
        "torch": torch.__version__,
    }
    with open(os.path.join(args.output, "training_info.json"), "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    log(f"total {time.time() - t_start:.0f}s; saved to {args.output}")


if __name__ == "__main__":
    main()
