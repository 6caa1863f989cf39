"""Settings of every learner, in a module that imports no torch.

A run's config (``treeplay.orchestrator.config``) validates its ``learner:`` section with these
classes, so loading or checking a config never pays for importing torch or transformers. The
learners themselves (``dpo.py``, ``tpo.py``, ``rft.py``, ``slhf.py``) import their settings from here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Deploy rule: an iteration whose weights moved by more than this many times their own norm
# (||theta_after - theta_before|| / ||theta_before||) is undone and not deployed (learners/guards.py).
MAX_UPDATE_RATIO = 10.0


class LoRAConfig(BaseModel):
    """A LoRA adapter (peft) that trains instead of the full weights."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(16, ge=1, description="Rank r of the low-rank update B·A.")
    alpha: float = Field(32.0, gt=0, description="Scale: the update is (alpha / rank)·B·A.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter's input (0 keeps the "
                           "policy's and the reference's log-probs of the same text equal at the start).")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1, description="Names of the linear layers that get an adapter (Llama/Qwen2 names).")


class LearnerConfig(BaseModel):
    """Settings every learner reads (the algorithm-specific configs extend this, one level)."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(1e-4, description="AdamW learning rate (tiny CPU models want ~1e-4, 7B models ~1e-6).")
    beta: float = Field(0.1, description="Implicit-reward inverse temperature (IPO's tau; SLHF's KL weight).")
    epochs: int = Field(1, ge=1, description="Passes over the data in one train() call.")
    batch_size: int = Field(16, ge=1, description="Examples (pairs, lists, prompts) per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer update.")
    max_length: int = Field(512, ge=2, description="Prompt + response tokens; longer ones are truncated.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    warmup_steps: int = Field(
        0, ge=0, description="Linear warm-up of the learning rate over the first updates."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradients are clipped to this norm.")
    skip_grad_norm: float = Field(
        1e4, gt=0, description="An update whose raw gradient norm exceeds this is skipped."
    )
    rollback: bool = Field(
        True, description="Keep a copy of the last good weights and roll back on a bad loss."
    )
    reference: Literal["fixed", "refresh", "none"] = Field(
        "fixed", description="fixed: the starting weights; refresh: the policy at each train() start."
    )
    seed: int = Field(0, description="Seeds shuffling and sampling.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="auto: bf16 on a capable GPU, else fp32."
    )
    device: str | None = Field(None, description="torch device; default cuda if available, else cpu.")
    num_threads: int | None = Field(
        None, ge=1, description="torch CPU threads (set it: the default can be slow)."
    )
    verify_at_end: bool = Field(
        True, description="One no-grad forward after training to check the final weights."
    )
    lora: LoRAConfig | None = Field(
        None, description="Train a LoRA adapter instead of the full weights (rank, alpha, dropout, "
        "target_modules); None: full fine-tuning."
    )


class DPOConfig(LearnerConfig):
    """DPO-family settings (plus everything in LearnerConfig)."""

    loss_type: Literal["sigmoid", "ipo", "mcts_dpo", "simpo"] = Field(
        "sigmoid", description="sigmoid DPO, IPO (beta is tau), MCTS-DPO (divergence + visit alpha), SimPO."
    )
    nll_weight: float = Field(
        1.0, ge=0.0, description="Weight of the chosen-response NLL term (RPO); 0 = plain."
    )
    pair_weight: float = Field(
        1.0, ge=0.0, description="Weight of the pairwise (preference) term; 0 = the NLL term alone, "
        "the ablation that tells what the preference term adds.")
    label_smoothing: float = Field(
        0.0, ge=0.0, le=0.5, description="Conservative-DPO epsilon for pairs whose record has none."
    )
    simpo_gamma: float = Field(0.5, description="SimPO target margin.")
    rejected_steps: int | None = Field(
        None, ge=1, description="Keep only the first k steps (action lines) of a rejected response: "
        "what follows a wrong step was forced by it and is not pushed down. None = all.")
    append_eos: Literal["final", "always", "never"] = Field(
        "final", description="Append EOS to responses: only for pairs with info['final'], always, or never."
    )


class TPOConfig(LearnerConfig):
    """TPO settings (plus everything in LearnerConfig)."""

    beta: float = Field(
        1.0, description="Scale of the implicit reward (scores are per-token means, so > DPO's)."
    )
    adaptive_steps: bool = Field(
        True, description="Adaptive step reward; False = plain LiPO-lambda on summed log-ratios."
    )
    step_weighting: Literal["dissimilar", "similar"] = Field(
        "dissimilar", description="w = 1 - cos (paper reading) or 1 + cos (code)."
    )
    step_anchor: Literal["others", "best"] = Field(
        "others", description="Compare a step with all other responses' or the best one's."
    )
    step_separator: str = Field("\n", description="Steps are split after this string.")
    weight_floor: float = Field(1e-2, ge=0.0, description="Added to dissimilar step weights.")
    gain_scale: float = Field(
        1.0, gt=0.0, description="Labels are rescaled per list to [0, gain_scale] before 2^psi."
    )
    nll_weight: float = Field(1.0, ge=0.0, description="NLL of the best response (RPO-style); 0 = off.")
    append_eos: Literal["final", "always", "never"] = Field(
        "final", description="EOS after responses: if the list's info['final'], always, never."
    )
    batch_size: int = Field(4, ge=1, description="Lists per micro-batch.")


class RFTConfig(LearnerConfig):
    """RFT settings (plus everything in LearnerConfig; ``beta`` is unused)."""

    reference: Literal["fixed", "refresh", "none"] = Field("none", description="RFT needs no reference model.")
    max_per_prompt: int = Field(
        4, ge=1, description="Most verified-correct responses kept per prompt (distinct texts)."
    )


class SLHFConfig(LearnerConfig):
    """SLHF settings (plus everything in LearnerConfig; ``beta`` is the KL weight)."""

    beta: float = Field(0.001, ge=0.0, description="KL coefficient for both players (tau^L = tau^F).")
    kl: Literal["k1", "k3"] = Field("k1", description="Per-token KL estimator.")
    follower_weight: float = Field(2.0, gt=1.0, description="w_F in L = L_L + w_F L_F; must exceed 1.")
    score_baseline: float = Field(0.5, description="Subtracted from the preference reward.")
    leader_update_frequency: int = Field(
        1, ge=1, description="Apply the leader's loss every this many steps."
    )
    temperature: float = Field(
        0.9, gt=0.0,
        description="Sampling temperature for both players; the log-probs the REINFORCE term and the "
        "KL use are those of the tempered distribution the samples came from (logits / temperature).",
    )
    follower_kl: Literal["prompt", "follower_prompt"] = Field(
        "prompt",
        description="What the follower's refinement is regularised toward: the reference model's answer "
        "to the bare prompt x ('prompt', the SLHF authors' default) or the reference model given the "
        "full follower prompt with x and y ('follower_prompt', their 'standard' option).",
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    max_new_tokens: int = Field(64, ge=1, description="Longest sampled response.")
    batch_size: int = Field(8, ge=1, description="Prompts per step.")
    follower_prompt: str | None = Field(
        None, description="Path of a follower template; default the package's."
    )
