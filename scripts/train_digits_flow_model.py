"""Trains the bundled flow-matching digits model (`diffalign/models/digits-flow`), an SD3-architecture pipeline.

A tiny Stable-Diffusion-3-style rectified-flow model, trained from scratch on scikit-learn's `load_digits`
(1797 grey 8x8 digits, bilinear-upsampled to 16x16, bright ink on dark, replicated to RGB), saved in the stock
diffusers `StableDiffusion3Pipeline` format:

* `vae`: the bundled digits VAE (`diffalign/models/digits/vae`, 4 latent channels, 16x16 <-> 4x8x8), reused
  unchanged; its config gets `shift_factor` = mean of the training latents and `scaling_factor` = 1 / their std
  around that mean (SD3 decodes `latents / scaling_factor + shift_factor`; training encodes the inverse).
* `transformer`: `SD3Transformer2DModel` (MM-DiT), patch size 1 on 4x8x8 latents (64 image tokens), 4 joint
  blocks, 4 heads x 16, RMS qk-norm, DiT-style zero-initialised adaLN modulation and output layer.
* `text_encoder` / `text_encoder_2`: two small `CLIPTextModelWithProjection` (hidden 32 / 8, CLIP's 49408-token
  vocabulary, 16 positions), both trained jointly with the transformer from a random init; the pipeline takes
  their penultimate hidden states (concatenated, 40 features, zero-padded to `joint_attention_dim`) as the
  sequence and their projected EOS states (32 + 32) as the pooled embedding. `tokenizer` / `tokenizer_2`:
  `diffalign.tokenization.offline_clip_tokenizer(16)`.
* `text_encoder_3` / `tokenizer_3`: a zero-output T5 stub (`T5EncoderModel` with 0 layers and all-zero weights,
  3 k parameters, + a 80-token T5 tokenizer). Its output is exactly the zeros that `StableDiffusion3Pipeline`
  feeds when `text_encoder_3=None`, so images are identical either way; it exists only because diffusers 0.42.1
  cannot load a directory whose `model_index.json` says `"text_encoder_3": [null, null]` unless the caller passes
  `text_encoder_3=None, tokenizer_3=None` (T5 is a required pipeline component), while with the stub a plain
  `StableDiffusion3Pipeline.from_pretrained(dir)` works.
* `scheduler`: `FlowMatchEulerDiscreteScheduler(shift=...)` (see `--shift`).

Training: rectified flow as in SD3 / diffusers' `train_dreambooth_sd3.py`: `x_t = (1 - s) x_0 + s * noise`, target
`v = noise - x_0`, MSE, sigma `s` logit-normal(0, 1), transformer timestep `1000 s`; 10% empty-prompt dropout (CFG),
EMA weights (transformer and both text encoders), prompts in 8 phrasings per digit
(`diffalign.rewards.digits.PROMPT_TEMPLATES`).

The T5 positions. The pipeline appends `max_sequence_length` (default 256) identical zero-T5 tokens to the 16 CLIP
tokens. Identical keys/values in softmax attention act exactly like one such token whose attention logit is raised
by log(N), so training uses one zero token plus an additive logit bias of log(N) (a custom joint-attention
processor used only in training), which is exact and ~6x cheaper than 256 real tokens. N is drawn log-uniformly
from [64, 512] per sample, so `max_sequence_length` 64..512 (256 by default, 128 as in Flow-GRPO) all work.

Weights are stored in fp16 safetensors; diffusers models load as fp32 by default and the three text encoder
configs say `"dtype": "float32"` (transformers' default `dtype="auto"` would otherwise give fp16 modules), so
`StableDiffusion3Pipeline.from_pretrained(path)` gives an all-fp32 pipeline. Tokenizers are stored as
vocab.json + merges.txt (no tokenizer.json), as in the UNet digits model.

Exact command of the committed weights (shared 2-core machine, torch 2.13 CPU, 1 thread; `--steps 3000` is now the
default, `--eval-shifts 1 3` also scores the samplers with shift 3, `--grid` saves sample grids)::

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python scripts/train_digits_flow_model.py --output diffalign/models/digits-flow \
        --steps 3000 --eval-shifts 1 3 --grid /tmp/fm_run/grid.png

Measured wall time: 23.6 min for the training (3000 steps at 0.3-0.65 s/step, load average 3-4.5 from other jobs),
then ~9 min for the evaluation. It trains, saves, then measures the base quality (200 fixed-seed images per CFG
scale, 20 Euler steps) and writes everything into `training_info.json`. `--eval-only` re-runs only the evaluation
of an existing directory (`--info-key` names where its results go in `training_info.json`), e.g.::

    HF_HUB_OFFLINE=1 python scripts/train_digits_flow_model.py --eval-only --eval-steps 10 --eval-cfg 1 \
        --eval-shifts 1 3 --info-key results_10_steps
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

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from diffalign.rewards.digits import (
    PROMPT_TEMPLATES,
    digit_correctness,
    digit_prompt,
    judge_predictions,
    load_digit_images,
    prompt_digits,
)
from diffalign.testing import tiny_clip_text_kwargs, tiny_t5_tokenizer
from diffalign.tokenization import offline_clip_tokenizer

DEFAULT_VAE = os.path.join(REPO, "diffalign", "models", "digits", "vae")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------- components
def build_text_encoders(seed, max_length):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    te1 = CLIPTextModelWithProjection(CLIPTextConfig(**tiny_clip_text_kwargs(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3,
        max_position_embeddings=max_length, projection_dim=32)))
    torch.manual_seed(seed + 100)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**tiny_clip_text_kwargs(
        hidden_size=8, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
        max_position_embeddings=max_length, projection_dim=32)))
    return te1, te2


def build_t5_stub(joint_attention_dim):
    """A T5 encoder whose output is exactly zero (0 layers, zero weights): what SD3 feeds when T5 is absent."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = tiny_t5_tokenizer(model_max_length=256)
    model = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=joint_attention_dim, d_kv=8, d_ff=8,
                                    num_layers=0, num_heads=1))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model.eval(), tokenizer


def build_transformer(latent_size, joint_attention_dim, pooled_dim, args):
    from diffusers import SD3Transformer2DModel

    inner = args.heads * args.head_dim
    model = SD3Transformer2DModel(
        sample_size=latent_size,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=args.layers,
        attention_head_dim=args.head_dim,
        num_attention_heads=args.heads,
        joint_attention_dim=joint_attention_dim,
        caption_projection_dim=inner,
        pooled_projection_dim=pooled_dim,
        pos_embed_max_size=latent_size,
        qk_norm="rms_norm",
    )
    # DiT-style init: adaLN modulations and the output projection start at zero (every block starts as identity).
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("norm1.linear", "norm1_context.linear", "norm_out.linear")) or name == "proj_out":
                module.weight.zero_()
                module.bias.zero_()
    return model


def build_scheduler(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


class ZeroTokenBiasJointAttnProcessor:
    """`JointAttnProcessor2_0` plus an additive attention-logit bias (`self.bias`, `[B, 1, 1, L]`, set per batch).

    Training only: with the bias log(N) on the last context token, one zero-T5 token stands exactly for the N
    identical zero tokens that `StableDiffusion3Pipeline` appends at inference (same keys, same values).
    """

    bias = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        residual = hidden_states
        b = hidden_states.shape[0]

        def heads(x):
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        cq = heads(attn.add_q_proj(encoder_hidden_states))
        ck = heads(attn.add_k_proj(encoder_hidden_states))
        cv = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            cq = attn.norm_added_q(cq)
        if attn.norm_added_k is not None:
            ck = attn.norm_added_k(ck)
        query, key, value = torch.cat([query, cq], 2), torch.cat([key, ck], 2), torch.cat([value, cv], 2)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=self.bias)
        out = out.transpose(1, 2).reshape(b, -1, query.shape[1] * query.shape[-1]).to(query.dtype)
        hidden_states, encoder_hidden_states = out[:, : residual.shape[1]], out[:, residual.shape[1]:]
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states, encoder_hidden_states


# ----------------------------------------------------------------------------------------------- training
def lr_at(step, total, base, warmup=100):
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


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


def encode_text(te1, te2, ids, joint_dim):
    """What `StableDiffusion3Pipeline.encode_prompt` computes (both tokenizers give the same ids), minus T5."""
    o1 = te1(ids, output_hidden_states=True)
    o2 = te2(ids, output_hidden_states=True)
    seq = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
    seq = F.pad(seq, (0, joint_dim - seq.shape[-1]))
    pooled = torch.cat([o1.text_embeds, o2.text_embeds], dim=-1)
    return seq, pooled


def train(latent_mean, latent_std, labels, te1, te2, cond_ids, uncond_ids, args):
    """Trains the transformer and both text encoders jointly; returns their EMA copies."""
    joint_dim = te1.config.hidden_size + te2.config.hidden_size
    pooled_dim = te1.config.projection_dim + te2.config.projection_dim
    torch.manual_seed(args.seed + 1)
    transformer = build_transformer(latent_mean.shape[-1], joint_dim, pooled_dim, args)
    models = (transformer, te1, te2)
    emas = [copy.deepcopy(m).eval().requires_grad_(False) for m in models]
    processor = ZeroTokenBiasJointAttnProcessor()
    transformer.set_attn_processor(processor)
    for m in models:
        m.train().requires_grad_(True)
    log(f"transformer params {sum(p.numel() for p in transformer.parameters()) / 1e6:.3f} M, text encoders "
        f"{sum(p.numel() for p in te1.parameters()) / 1e6:.3f} M + {sum(p.numel() for p in te2.parameters()) / 1e6:.3f} M")
    # No weight decay on the text encoders: rows of unused tokens then stay exactly as initialised.
    opt = torch.optim.AdamW([{"params": transformer.parameters(), "weight_decay": 1e-4},
                             {"params": list(te1.parameters()) + list(te2.parameters()), "weight_decay": 0.0}],
                            lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed + 1)
    n_img = latent_mean.shape[-1] * latent_mean.shape[-2]
    log_lo, log_hi = math.log(args.t5_tokens_min), math.log(args.t5_tokens_max)
    t0, running = time.time(), []
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr)
        bsz = args.batch_size
        idx = torch.randint(0, len(labels), (bsz,), generator=gen)
        z0 = latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=gen)
        z0 = (z0 - args.shift_factor) * args.scaling_factor
        phrasing = torch.randint(0, cond_ids.shape[1], (bsz,), generator=gen)
        ids = cond_ids[labels[idx], phrasing]
        drop = torch.rand(bsz, generator=gen) < args.uncond_prob
        ids = torch.where(drop[:, None], uncond_ids[None], ids)
        seq, pooled = encode_text(te1, te2, ids, joint_dim)
        context = torch.cat([seq, seq.new_zeros(bsz, 1, joint_dim)], dim=1)  # + one token for the N zero-T5 ones
        log_n = log_lo + (log_hi - log_lo) * torch.rand(bsz, generator=gen)
        bias = torch.zeros(bsz, 1, 1, n_img + context.shape[1])
        bias[:, 0, 0, -1] = log_n
        processor.bias = bias
        sigma = torch.sigmoid(args.logit_mean + args.logit_std * torch.randn(bsz, generator=gen))
        noise = torch.randn(z0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * z0 + s * noise
        pred = transformer(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=context,
                           pooled_projections=pooled, return_dict=False)[0]
        loss = F.mse_loss(pred, noise - z0)
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
        if (step + 1) % 100 == 0 or step + 1 == args.steps:
            log(f"step {step + 1}/{args.steps} loss {sum(running[-100:]) / len(running[-100:]):.4f} "
                f"({time.time() - t0:.0f}s)")
    return emas


# ----------------------------------------------------------------------------------------------- saving
def save_pipeline(components, output, fp16):
    from diffusers import StableDiffusion3Pipeline

    from diffalign.tokenization import write_clip_vocab

    pipe = StableDiffusion3Pipeline(**components)
    if fp16:
        pipe.to(torch.float16)
    for sub in ("transformer", "vae", "scheduler") + TEXT_ENCODERS + ("tokenizer", "tokenizer_2", "tokenizer_3"):
        shutil.rmtree(os.path.join(output, sub), ignore_errors=True)
    pipe.save_pretrained(output, safe_serialization=True)
    # Text encoders: fp16 weights, but load as fp32 by default (transformers' dtype="auto" reads this).
    for sub in TEXT_ENCODERS:
        path = os.path.join(output, sub, "config.json")
        with open(path) as f:
            config = json.load(f)
        config["dtype"] = "float32"
        with open(path, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
    # CLIP tokenizers: vocab.json + merges.txt (1.5 MB) instead of tokenizer.json (3.6 MB); same ids.
    for sub in ("tokenizer", "tokenizer_2"):
        tok_dir = os.path.join(output, sub)
        os.remove(os.path.join(tok_dir, "tokenizer.json"))
        write_clip_vocab(tok_dir)


# ----------------------------------------------------------------------------------------------- evaluation
def load_pipeline(model_dir, shift=None):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir)
    if shift is not None:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=shift)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def evaluate(pipe, num_per_digit, steps, guidance_scale, seed=0, batch_size=100, grid=None, max_sequence_length=256):
    """Like `scripts/eval_digits_model.py`: prompts cycle the phrasings, generator seed+i per batch."""
    prompts = [digit_prompt(d, i % len(PROMPT_TEMPLATES)) for d in range(10) for i in range(num_per_digit)]
    t0 = time.time()
    images = []
    for i in range(0, len(prompts), batch_size):
        out = pipe(prompts[i : i + batch_size], num_inference_steps=steps, guidance_scale=guidance_scale,
                   generator=torch.Generator().manual_seed(seed + i), output_type="pt",
                   max_sequence_length=max_sequence_length)
        images.append(out.images.float().cpu())
    images = torch.cat(images)
    seconds = time.time() - t0
    reward = digit_correctness()(images, prompts, None)
    targets = prompt_digits(prompts)
    correct = (judge_predictions(images) == targets).float()
    if grid:
        sys.path.insert(0, os.path.join(REPO, "scripts"))
        from eval_digits_model import save_grid

        save_grid(images, 10, grid)
    return {
        "steps": steps,
        "guidance_scale": guidance_scale,
        "shift": pipe.scheduler.config.shift,
        "max_sequence_length": max_sequence_length,
        "num_images": len(prompts),
        "reward_mean": round(reward.mean().item(), 4),
        "reward_std": round(reward.std().item(), 4),
        "judge_accuracy": round(correct.mean().item(), 4),
        "judge_per_digit": [round(correct[targets == d].mean().item(), 2) for d in range(10)],
        "sample_seconds": round(seconds, 1),
    }


def run_eval(args):
    results = []
    shifts = args.eval_shifts or [None]
    for shift in shifts:
        pipe = load_pipeline(args.output, shift)
        for cfg in args.eval_cfg:
            grid = None
            if args.grid:
                root, ext = os.path.splitext(args.grid)
                grid = f"{root}_shift{pipe.scheduler.config.shift:g}_cfg{cfg:g}{ext or '.png'}"
            result = evaluate(pipe, args.eval_per_digit, args.eval_steps, cfg, seed=args.seed, grid=grid,
                              max_sequence_length=args.eval_max_sequence_length)
            log(json.dumps(result))
            results.append(result)
    return results


def update_info(output, **fields):
    path = os.path.join(output, "training_info.json")
    info = {}
    if os.path.exists(path):
        with open(path) as f:
            info = json.load(f)
    info.update(fields)
    with open(path, "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")


# ----------------------------------------------------------------------------------------------- main
def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=os.path.join(REPO, "diffalign", "models", "digits-flow"))
    parser.add_argument("--vae", default=DEFAULT_VAE, help="the (trained) digits VAE to reuse")
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=16, help="CLIP tokenizer/text encoder positions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=16)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--uncond-prob", type=float, default=0.1)
    parser.add_argument("--logit-mean", type=float, default=0.0, help="logit-normal sigma sampling (SD3)")
    parser.add_argument("--logit-std", type=float, default=1.0)
    parser.add_argument("--t5-tokens-min", type=int, default=64, help="range of zero-T5 positions trained for")
    parser.add_argument("--t5-tokens-max", type=int, default=512)
    parser.add_argument("--shift", type=float, default=1.0, help="FlowMatchEulerDiscreteScheduler shift saved")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is much faster when other processes share the cores)")
    parser.add_argument("--fp32", action="store_true", help="store fp32 weights (default fp16)")
    parser.add_argument("--eval-only", action="store_true", help="only evaluate --output (no training)")
    parser.add_argument("--eval-cfg", type=float, nargs="*", default=[1.0, 2.0, 4.5])
    parser.add_argument("--eval-steps", type=int, default=20)
    parser.add_argument("--eval-per-digit", type=int, default=20)
    parser.add_argument("--eval-max-sequence-length", type=int, default=256, help="zero-T5 positions when sampling")
    parser.add_argument("--eval-shifts", type=float, nargs="*", default=None,
                        help="scheduler shifts to evaluate (default: the saved one)")
    parser.add_argument("--grid", default=None, help="save PNG grids of the eval samples (suffixed per setting)")
    parser.add_argument("--no-write-info", action="store_true", help="--eval-only: do not write training_info.json")
    parser.add_argument("--info-key", default="base_results", help="--eval-only: training_info.json key of the results")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    command = "python " + " ".join(sys.argv)
    if args.eval_only:
        t0 = time.time()
        results = run_eval(args)
        if not args.no_write_info:
            update_info(args.output, **{args.info_key: {"command": command, "results": results,
                                                        "seconds": round(time.time() - t0)}})
        return

    from diffusers import AutoencoderKL

    t_start = time.time()
    images, labels = load_digit_images(args.resolution)
    log(f"data {tuple(images.shape)} -> {args.output}")
    tokenizer = offline_clip_tokenizer(model_max_length=args.max_length)
    te1, te2 = build_text_encoders(args.seed, args.max_length)
    cond_ids, uncond_ids = prompt_ids(tokenizer)

    vae = AutoencoderKL.from_pretrained(args.vae, torch_dtype=torch.float32).eval().requires_grad_(False)
    mean, std = encode_all(vae, images)
    args.shift_factor = mean.mean().item()
    args.scaling_factor = 1.0 / ((mean - args.shift_factor).pow(2).mean() + std.pow(2).mean()).sqrt().item()
    vae.register_to_config(shift_factor=args.shift_factor, scaling_factor=args.scaling_factor)
    log(f"vae {args.vae}: shift_factor {args.shift_factor:.4f}, scaling_factor {args.scaling_factor:.4f}")

    t0 = time.time()
    transformer, te1, te2 = train(mean, std, labels, te1, te2, cond_ids, uncond_ids, args)
    t_train = time.time() - t0
    log(f"training done in {t_train:.0f}s")

    t5, t5_tokenizer = build_t5_stub(transformer.config.joint_attention_dim)
    os.makedirs(args.output, exist_ok=True)
    components = {"transformer": transformer, "scheduler": build_scheduler(args.shift), "vae": vae,
                  "text_encoder": te1, "tokenizer": tokenizer, "text_encoder_2": te2,
                  "tokenizer_2": offline_clip_tokenizer(model_max_length=args.max_length),
                  "text_encoder_3": t5, "tokenizer_3": t5_tokenizer}
    save_pipeline(components, args.output, fp16=not args.fp32)
    info = {
        "command": command,
        "resolution": args.resolution,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "transformer": {"layers": args.layers, "heads": args.heads, "head_dim": args.head_dim, "patch_size": 1},
        "sigma_sampling": f"logit-normal({args.logit_mean}, {args.logit_std})",
        "t5_zero_tokens_trained": [args.t5_tokens_min, args.t5_tokens_max],
        "vae": "reused from diffalign/models/digits/vae",
        "shift_factor": args.shift_factor,
        "scaling_factor": args.scaling_factor,
        "scheduler_shift": args.shift,
        "seconds": {"train": round(t_train), "total": round(time.time() - t_start)},
        "threads": args.threads,
        "torch": torch.__version__,
    }
    with open(os.path.join(args.output, "training_info.json"), "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    log(f"total {time.time() - t_start:.0f}s; saved to {args.output}")
    t0 = time.time()
    results = run_eval(args)
    update_info(args.output, base_results=results, eval_seconds=round(time.time() - t0))


if __name__ == "__main__":
    main()
