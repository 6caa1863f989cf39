"""What every learner shares: a policy being trained, its reference, its optimizer, its guard rails.

A learner (``DPOLearner``, ``TPOLearner``, ``SLHFLearner``, ``RFTLearner``) *has* a
``TrainablePolicy``; it does not inherit from one. The policy object owns:

- the model and tokenizer loaded from a Hugging Face directory, on the configured device/dtype
  (``dtype="auto"``: bf16 on a GPU that supports it, fp32 elsewhere);
- the reference model: ``"fixed"`` (the starting weights, for the whole run) or ``"refresh"``
  (the policy's weights at the start of every ``train()`` call, as in Curry-DPO and iterative
  DPO); ``"none"`` for reference-free losses;
- one AdamW optimizer whose state survives across ``train()`` calls (iterations);
- guard rails: an update whose loss is NaN/inf, or whose gradient norm is non-finite or above
  ``skip_grad_norm``, is skipped; when a loss comes out non-finite the weights are rolled back to
  the last ones known to give a finite loss; ``healthy`` says whether the current weights are
  usable, and ``state_dict()`` never hands out weights that are not;
- ``save(path)``: a Hugging Face directory (model + tokenizer) that transformers and vLLM load;
- ``training_state()`` / ``load_training_state()``: everything besides the weights that continuing
  training needs (optimizer moments, update count = warm-up position, train() calls, RNG states, the
  reference's identity); a learner's ``save_checkpoint(path)`` (``LearnerOutput``, base.py) writes
  it with the weights under ``trainer/`` of the directory, atomically (checkpoints.py), and
  ``restore_checkpoint(path)`` reads it back.

This module holds the settings (``LearnerConfig``, ``LoRAConfig``), ``TrainablePolicy`` and
``AdapterReference``. The shared loop (``run_epochs``: shuffle, micro-batches, gradient
accumulation, metrics) is in epochs.py, checkpoint I/O in checkpoints.py, ``LearnerOutput`` in
base.py; import them from there.

LoRA (``LearnerConfig.lora``, with peft): the base weights are frozen and only the adapter trains;
the reference is the same model with the adapter switched off (``fixed``: the base, i.e. the
starting model) or switched to a frozen copy of the adapter taken at every ``train()`` start
(``refresh``), so there is never a second copy of the base weights; the optimizer holds the
adapter's parameters only; ``state_dict()`` hands out the adapter alone, in ``adapter_tensors``'s
form (the shape engines load as an adapter, ``engines.lora``); checkpoints hold the
adapter and the training state, and name their base model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from treeplay.learners.checkpoints import STATE_FORMAT, fingerprint, rng_state, set_rng_state, to_cpu
from treeplay.learners.config import LearnerConfig, LoRAConfig
from treeplay.store.records import uri_to_path


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


class TrainablePolicy:
    """A causal LM being trained, with its reference, optimizer and guard rails.

    Args:
        model_path: A Hugging Face model directory.
        config: Learner settings.
    """

    def __init__(self, model_path: str | Path, config: LearnerConfig):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = resolve_dtype(config.dtype, self.device)
        torch.manual_seed(config.seed)
        from treeplay.engines.lora import adapter_base

        # A LoRA checkpoint holds an adapter and names its base model: load the base, then the adapter.
        adapter_dir, base_path = None, Path(model_path)
        if (base := adapter_base(model_path)) is not None:
            if config.lora is None:
                raise ValueError(f"'{model_path}' is a LoRA checkpoint; set the learner's lora settings to train it")
            adapter_dir, base_path = Path(model_path), base
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(base_path, dtype=self.dtype).to(self.device)
        for module in self.model.modules():
            # Dropout makes the policy's and the reference's log-probs of the same text disagree.
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        self.model.train()
        self.peft: Any = None
        self.base_path = base_path
        if config.lora is not None:
            self._add_adapter(config.lora, adapter_dir)
        self.reference: torch.nn.Module | None = None
        if config.reference != "none":
            if self.peft is not None:
                # No second copy of the weights: the reference is this model with the adapter off
                # (fixed) or on a frozen copy of the adapter (refresh).
                self.reference = AdapterReference(self, refresh=config.reference == "refresh")
            else:
                self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.lr, betas=config.adam_betas, weight_decay=config.weight_decay
        )
        self.updates = 0
        self.skipped_updates = 0
        self.last_skip_reason: str | None = None
        self.healthy = True
        self.calls = 0
        self._good = [p.detach().clone() for p in self.params] if config.rollback else None
        # Where the reference's weights came from (a URI), recorded in checkpoints; whoever loads
        # the policy from a temporary copy (the learner actor) sets the real origin.
        self.reference_source: str | None = Path(base_path if self.peft is not None else model_path).resolve().as_uri()
        self._reference_fingerprint: str | None = None

    def _add_adapter(self, lora: LoRAConfig, adapter_dir: Path | None) -> None:
        """Wrap the model's target layers with a LoRA adapter (peft), in place; load its weights
        from a checkpoint's adapter when resuming."""
        from peft import LoraConfig, get_peft_model

        names = {name.rsplit(".", 1)[-1] for name, _ in self.model.named_modules()}
        missing = [m for m in lora.target_modules if m not in names]
        if missing:
            raise ValueError(f"lora.target_modules {missing} are not layers of this model")
        self.peft = get_peft_model(self.model, LoraConfig(
            r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM"))
        # get_peft_model wraps the layers of self.model in place; self.model stays the transformers
        # model (what packed_logprobs and generate expect) and now carries the adapter.
        if adapter_dir is not None:
            from treeplay.engines.lora import read_adapter

            self.load_adapter(read_adapter(adapter_dir))

    def load_adapter(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy ``adapter_tensors``-form tensors into the adapter (in place)."""
        from treeplay.engines.lora import to_module_tensors

        params = dict(self.model.named_parameters())
        scale = self.config.lora.alpha / self.config.lora.rank  # type: ignore[union-attr]
        with torch.no_grad():
            for name, value in to_module_tensors(tensors, "default", scale).items():
                if name not in params or tuple(params[name].shape) != tuple(value.shape):
                    raise ValueError(f"adapter tensor {name!r} does not fit this model's adapter")
                params[name].copy_(value.to(params[name].device, params[name].dtype))
    # -- iterations -------------------------------------------------------------------------------

    def begin_iteration(self) -> None:
        """Start a train() call: refresh the reference if configured (not on the first call), and
        make the weights the call starts from its rollback point."""
        if self.config.reference == "refresh" and self.calls > 0 and self.reference is not None:
            if isinstance(self.reference, AdapterReference):
                self.reference.refresh()
            else:
                self.reference.load_state_dict(self.model.state_dict())
        if self._good is not None:
            # These weights passed the previous call's final check (or are the starting ones). Taking
            # them as the rollback point, rather than whatever the previous call last copied, also
            # makes a policy restored from a checkpoint roll back exactly as the uninterrupted one.
            with torch.no_grad():
                torch._foreach_copy_(self._good, [p.detach() for p in self.params])
        self.calls += 1

    # -- reference --------------------------------------------------------------------------------

    def load_reference(self, model_path: str | Path, source: str | None = None) -> None:
        """Replace the reference's weights with those of a Hugging Face directory (a resumed run's
        fixed reference is its starting model, not the checkpoint the policy resumes from)."""
        from transformers import AutoModelForCausalLM

        if self.reference is None:
            return
        if isinstance(self.reference, AdapterReference):
            # The reference is the base with the adapter off: the base this policy was built on.
            self.reference_source = source or Path(model_path).resolve().as_uri()
            self._reference_fingerprint = None
            return
        other = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.dtype)
        self.reference.load_state_dict(other.state_dict())
        del other
        self.reference_source = source or Path(model_path).resolve().as_uri()
        self._reference_fingerprint = None

    def reference_fingerprint(self) -> str | None:
        """A hash of the reference's weights (None without a reference); computed once per reference."""
        if self.reference is None:
            return None
        if self._reference_fingerprint is None or self.config.reference == "refresh":
            self._reference_fingerprint = fingerprint(self.reference.state_dict())
        return self._reference_fingerprint

    # -- updates ----------------------------------------------------------------------------------

    def _set_lr(self) -> None:
        warm = self.config.warmup_steps
        scale = min(1.0, (self.updates + 1) / warm) if warm else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr * scale

    def skip(self, reason: str, bad_weights: bool) -> None:
        """Drop the accumulated gradient; if the current weights gave a bad loss, roll them back."""
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_updates += 1
        self.last_skip_reason = reason
        if bad_weights:
            self.restore_good()

    def restore_good(self) -> None:
        """Put back the last weights known to give a finite loss (no-op without rollback)."""
        if self._good is None:
            self.healthy = False
            return
        with torch.no_grad():
            for p, g in zip(self.params, self._good, strict=True):
                p.copy_(g)
        self.healthy = True

    def update(self, loss_finite: bool) -> tuple[bool, float]:
        """Apply the accumulated gradient, unless a guard rail says no.

        Args:
            loss_finite: Whether every micro-batch loss of this update was finite (if not, the
                micro-batches with a bad loss were not back-propagated).

        Returns:
            ``(applied, grad_norm)``; grad_norm is NaN when the loss was bad.
        """
        if not loss_finite:
            self.skip("non-finite loss", bad_weights=True)
            return False, math.nan
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm))
        if not math.isfinite(norm):
            self.skip("non-finite gradient norm", bad_weights=False)
            return False, norm
        if norm > self.config.skip_grad_norm:
            self.skip(f"gradient norm {norm:.3g} above skip_grad_norm {self.config.skip_grad_norm:g}", False)
            return False, norm
        if self._good is not None:
            # These weights just gave a finite loss and gradient: remember them before moving on.
            with torch.no_grad():
                torch._foreach_copy_(self._good, [p.detach() for p in self.params])
        self._set_lr()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        return True, norm

    def verify(self, loss_fn: Callable[[], torch.Tensor]) -> None:
        """Check the final weights with one no-grad loss; roll back if it is not finite."""
        with torch.no_grad():
            params_ok = all(bool(torch.isfinite(p).all()) for p in self.params)
            ok = params_ok and bool(torch.isfinite(loss_fn()))
        if not ok:
            self.skipped_updates += 1
            self.last_skip_reason = "final weights give a non-finite loss"
            self.restore_good()
        else:
            self.healthy = True

    # -- output -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Weights for redeploy: CPU tensors under Hugging Face names; never unhealthy weights.

        With LoRA, the adapter alone (``engines.lora.adapter_tensors``: ``<layer>.lora_A.weight`` and
        ``<layer>.lora_B.weight`` with the alpha/rank scale folded into B)."""
        if not self.healthy:
            raise RuntimeError(
                "the policy has no healthy weights to hand out (rollback is off and training broke)"
            )
        if self.peft is not None:
            from treeplay.engines.lora import adapter_tensors

            scale = self.config.lora.alpha / self.config.lora.rank  # type: ignore[union-attr]
            return adapter_tensors(dict(self.model.named_parameters()), "default", scale)
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Put back what ``state_dict()`` handed out (the full weights, or the adapter with LoRA)."""
        if self.peft is not None:
            self.load_adapter(state_dict)
        else:
            self.model.load_state_dict(state_dict)

    def save(self, path: str | Path) -> Path:
        """Write the model and tokenizer as a Hugging Face directory; with LoRA the adapter, a
        config.json and the tokenizer, naming the base model (``engines.lora.write_adapter``)."""
        if not self.healthy:
            raise RuntimeError("refusing to save unhealthy weights")
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        if self.peft is not None:
            from treeplay.engines.lora import write_adapter

            # The base is named by its origin when that is a plain model directory: a learner actor
            # loads from a temporary copy, which a resumed run would not find.
            try:
                origin = uri_to_path(self.reference_source) if self.reference_source else None
            except ValueError:  # not a local path
                origin = None
            base = origin if origin is not None and (origin / "config.json").is_file() and not (
                origin / "adapter_config.json").is_file() else self.base_path
            write_adapter(out, self.state_dict(), base, self.model.config)
            self.model.generation_config.save_pretrained(out)
        else:
            self.model.save_pretrained(out, safe_serialization=True)
        self.tokenizer.save_pretrained(out)
        return out

    # -- training state ---------------------------------------------------------------------------

    def training_state(self) -> dict[str, Any]:
        """Everything besides the weights that continuing training needs, as CPU copies.

        The optimizer's moments and step counts, the update count (the warm-up position), the number
        of train() calls (it seeds each call's shuffle and says whether the reference is refreshed),
        the RNG states (torch, CUDA, Python, numpy: SLHF samples with torch's) and the reference's
        identity (kind, origin, a hash of its weights). Not the reference's weights: a fixed
        reference is the run's starting model, a refreshed one is rebuilt from the policy at the
        next call, and ``reference_fingerprint`` checks that a restored one is the right model.
        """
        return {
            "format": STATE_FORMAT,
            "optimizer": to_cpu(self.optimizer.state_dict()),
            "updates": self.updates,
            "skipped_updates": self.skipped_updates,
            "calls": self.calls,
            "rng": rng_state(),
            "reference": {
                "kind": self.config.reference,
                "source": self.reference_source,
                "fingerprint": self.reference_fingerprint() if self.config.reference == "fixed" else None,
            },
        }

    def load_training_state(self, state: dict[str, Any], check_reference: bool = True) -> None:
        """Continue from ``training_state()``'s output; the weights must already be loaded.

        Raises:
            ValueError: A state of another format, or taken with another kind of reference, or (with
                ``check_reference``) a fixed reference whose weights are not the ones loaded here.
        """
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"training state format {state.get('format')!r} is not {STATE_FORMAT}")
        ref = state["reference"]
        if ref["kind"] != self.config.reference:
            raise ValueError(
                f"the training state was taken with reference '{ref['kind']}', the config says "
                f"'{self.config.reference}'"
            )
        if check_reference and ref["kind"] == "fixed" and ref["fingerprint"] != self.reference_fingerprint():
            raise ValueError(
                f"the reference model loaded from {self.reference_source} is not the one training used "
                f"({ref['source']}): weight hashes {self.reference_fingerprint()} != {ref['fingerprint']}"
            )
        self.optimizer.load_state_dict(state["optimizer"])  # moves the moments to the params' device
        self.updates = int(state["updates"])
        self.skipped_updates = int(state["skipped_updates"])
        self.calls = int(state["calls"])
        set_rng_state(state["rng"])
        if ref.get("source"):
            self.reference_source = ref["source"]


class AdapterReference(torch.nn.Module):
    """A LoRA policy's reference without a second copy of the weights.

    ``packed_logprobs(reference, batch)`` runs the policy's own model with the adapter off
    (``fixed``: the base model, the run's start) or, for ``refresh``, with a second, frozen adapter
    ("reference") that ``refresh()`` copies from the trained one at each ``train()`` start.
    """

    def __init__(self, policy: TrainablePolicy, refresh: bool) -> None:
        super().__init__()
        self._policy = [policy]  # a list: not registered as a submodule (its parameters are the policy's)
        self.refresh_mode = refresh
        self.base_model_prefix = "decoder"
        if refresh:
            policy.peft.add_adapter("reference", policy.peft.peft_config["default"])
            policy.peft.set_adapter("default")  # add_adapter leaves the active adapter; keep training "default"
            self.refresh()

    @property
    def decoder(self):
        policy = self._policy[0]
        inner = getattr(policy.model, policy.model.base_model_prefix)

        def run(**kwargs):
            peft = policy.peft
            if self.refresh_mode:
                # Switch the active adapter by hand: peft's set_adapter also flips requires_grad.
                layers = [m for m in policy.model.modules() if hasattr(m, "_active_adapter") and hasattr(m, "lora_A")]
                for m in layers:
                    m._active_adapter = ["reference"]
                try:
                    return inner(**kwargs)
                finally:
                    for m in layers:
                        m._active_adapter = ["default"]
            with peft.disable_adapter():
                return inner(**kwargs)

        return run

    def get_output_embeddings(self):
        return self._policy[0].model.get_output_embeddings()

    def parameters(self, recurse: bool = True):
        return self._policy[0].model.parameters(recurse)

    def refresh(self) -> None:
        """Make the reference adapter a copy of the trained one."""
        params = dict(self._policy[0].model.named_parameters())
        with torch.no_grad():
            for name, p in params.items():
                if ".default." in name and "lora_" in name:
                    params[name.replace(".default.", ".reference.")].copy_(p)

    def state_dict(self, *args, **kwargs):  # type: ignore[override]
        """What the reference computes with: the base weights (and the reference adapter, if any)."""
        out = {}
        for name, p in self._policy[0].model.named_parameters():
            if "lora_" not in name:
                out[name.replace(".base_layer.", ".")] = p.detach()
            elif self.refresh_mode and ".reference." in name:
                out[name] = p.detach()
        return out
