"""DiffusionNFT (Zheng et al., "DiffusionNFT: Online Diffusion Reinforcement with Forward Process", 2025,
arXiv 2509.16117): negative-aware fine-tuning of final samples on the forward process, as NVlabs/DiffusionNFT."""

from dataclasses import dataclass
from typing import List, Optional

import torch

from ..advantages import group_advantages
from ..losses import nft_loss, optimality_probability
from ..utils.peft_utils import BASE_ADAPTER
from .forward_base import OLD_ADAPTER, ForwardProcessBatch, ForwardProcessTrainer
from .nft_config import NFTConfig
from .update_plan import Rows


@dataclass
class NFTBatch(ForwardProcessBatch):
    """The epoch's final samples with each one's optimality probability `optimality`."""

    optimality: Optional[torch.Tensor] = None


class NFTTrainer(ForwardProcessTrainer):
    """DiffusionNFT: sample final images with the old policy (CFG-free, deterministic), score them, then pull the
    implicit positive policy towards high-reward samples and the negative one towards low-reward ones at noise
    levels of the sampler (`diffalign.losses.nft_loss`); the old policy follows the trained one by an EMA.

    ```python
    from diffalign.config import load_config
    from diffalign.trainers import NFTTrainer

    NFTTrainer(load_config("nft", "digits-flow-nft")).train()
    ```
    """

    config_class = NFTConfig
    loss_stats = ("loss", "policy_loss", "kl", "old_deviation", "old_kl")

    def training_batch(self, trajectories, rewards, all_rewards, all_prompts: List[str], epoch: int) -> NFTBatch:
        """Advantages over the epoch's global batch (per prompt mean, the batch's std: NVIDIA's
        `PerPromptStatTracker(global_std=True)`), and this process's optimality probabilities."""
        config = self.config
        ids = {prompt: i for i, prompt in enumerate(dict.fromkeys(all_prompts))}
        advantages = group_advantages(all_rewards, torch.tensor([ids[p] for p in all_prompts]), global_std=True)
        n = len(trajectories)
        first = self.global_sample_offset(n)
        optimality = optimality_probability(advantages[first : first + n], config.train_adv_clip_max,
                                            config.train_adv_mode)
        return NFTBatch(trajectories.to(self.device), rewards=rewards.to(self.device),
                        all_rewards=all_rewards.detach().cpu().float(), optimality=optimality.to(self.device),
                        first_index=first, epoch=epoch)

    def model_outputs(self, model, batch: NFTBatch, rows: Rows):
        """At `x_t = alpha_t x0 + sigma_t eps` (the sampler's noise level of each row, fresh noise): the trained
        policy's output (with gradients), and the old policy's and the base model's (one no-grad forward)."""
        noised = self.noised_rows(batch, rows)
        adapters = [OLD_ADAPTER] + ([BASE_ADAPTER] if self.config.train_kl_coef > 0 else [])
        old_output, *ref_output = self.frozen_predictions(model, adapters, noised)
        output = self.policy_prediction(model, noised)
        return output, old_output, (ref_output[0] if ref_output else None), noised

    def compute_loss(self, outputs, batch: NFTBatch, rows: Rows):
        """`nft_loss` of a micro-batch of (sample, noise level) rows."""
        config = self.config
        output, old_output, ref_output, noised = outputs
        out = nft_loss(output, old_output, ref_output, noised.x_t, noised.x0, noised.alpha_t, noised.sigma_t,
                       batch.optimality[rows.samples], config.train_beta, config.train_adv_clip_max,
                       config.train_kl_coef, noised.prediction_type)
        return out["loss"], {key: out[key].detach() for key in self.loss_stats}
