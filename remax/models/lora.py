"""LoRA adapters (``model.lora``): the one model transform applied after a model loads.

torchtitan's converter idea: a stage loads its model as it always does, then hands it to
:func:`adapt`, which injects PEFT LoRA layers in place (``peft.inject_adapter_in_model``: the model
stays the HF class it was, so generation, the score head and the rollout engines read it as
before) and freezes every base weight. ``model.lora.rank=0`` makes every function here a no-op.

- **Reference.** :func:`reference` is the frozen π_ref of an RL stage: a deep copy of the policy
  without adapters, and with them the policy itself with its adapters switched off (verl's
  ``disable_adapter``): the base weights are held once. Under DeepSpeed the view calls the
  engine's module, so ZeRO-2 and ZeRO-3 (parameters gathered by the module's hooks) both work.
- **Export.** :func:`export_weights` merges the adapters into plain HF weights
  (W + (alpha / r) · B A, the keys the base model had), so ``export/`` reads as today, and returns
  the adapter alone in PEFT's ``save_pretrained`` layout for ``export/adapter/``.
- **Checkpoints** hold the trainable tensors only (``remax.engines``) and :func:`base_sha256`,
  the hash of the frozen base weights, which a resume compares (``remax.trainers.checkpointer``).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from pathlib import Path

import torch

from remax.config.model import LoraConfig
from remax.inputs import InputError
from remax.plan_lora import DEFAULT_TARGETS

ADAPTER = "default"  # PEFT's adapter name; one adapter per model
BASE_HASH = "remax_base_sha256"  # attribute of an adapted model: its frozen base weights' hash


def target_modules(model: torch.nn.Module, cfg: LoraConfig) -> list[str]:
    """``cfg.target_modules``, or the architecture's default (Llama/Mistral/Qwen2, OPT)."""
    if cfg.target_modules is not None:
        return list(cfg.target_modules)
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in DEFAULT_TARGETS:
        raise InputError(
            f"model.lora.target_modules: no default for architecture {kind!r} (defaults: "
            f"{', '.join(sorted(DEFAULT_TARGETS))}); name its linear layers, e.g. "
            "model.lora.target_modules=[q_proj,v_proj]"
        )
    return list(DEFAULT_TARGETS[kind])


def adapt(
    model: torch.nn.Module, cfg: LoraConfig, *, seed: int, train: tuple[str, ...] = ()
) -> torch.nn.Module:
    """Inject LoRA adapters into ``model`` in place and freeze its base weights; returns it.

    ``train``: top-level modules that stay fully trainable (the reward model's and critic's
    ``score`` head, which is new and not a low-rank update of anything). The adapters' init
    (A random, B zero: the adapted model starts equal to the base) is drawn from ``seed``, so it
    is the same on every rank and in every run. No-op when ``cfg.rank`` is 0.
    """
    if not cfg.enabled:
        return model
    import peft

    config = peft.LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=target_modules(model, cfg),
        modules_to_save=list(train) or None,
        bias="none",
        base_model_name_or_path=getattr(model, "name_or_path", None) or None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # modules_to_save is not injected here: the head is trained in place (below), and the
        # config keeps the name so export/adapter/ loads with PEFT's PeftModel.from_pretrained.
        peft.inject_adapter_in_model(_without_heads(config), model, adapter_name=ADAPTER)
    for name in train:
        getattr(model, name).requires_grad_(True)
    model.remax_lora_config = config
    setattr(model, BASE_HASH, base_sha256(model))
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.x
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if checkpointing:
        # Reentrant checkpointing skips a block whose inputs need no grad (frozen embeddings).
        model.enable_input_require_grads()
    return model


def _without_heads(config):
    bare = copy.copy(config)
    bare.modules_to_save = None
    return bare


def lora_layers(model: torch.nn.Module) -> list:
    """The LoRA layers of ``model`` (empty without adapters; then PEFT is not imported)."""
    if getattr(model, "remax_lora_config", None) is None:
        return []
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def base_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of the frozen parameters (name, dtype, shape, bytes): the base an adapter adapts."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        t = p.detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module):
    """Forwards of ``model`` inside run its base weights alone.

    Sets PEFT's per-layer flag directly: ``enable_adapters(False)`` would also flip the adapters'
    ``requires_grad``, which the optimizer and ZeRO's gradient hooks must not see mid-step.
    """
    layers = lora_layers(model)
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer in layers:
            layer._disable_adapters = False


class AdaptersOff:
    """The reference policy of an adapted actor: calls it with its adapters disabled.

    Not an ``nn.Module`` and holds no parameter: it cannot be frozen, placed or optimised apart
    from the actor (``remax.engines.frozen`` passes it through)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __call__(self, *args, **kwargs):
        with adapters_disabled(self.model):
            return self.model(*args, **kwargs)


def reference(model: torch.nn.Module):
    """π_ref of an RL stage whose policy is ``model`` (call before the engine wraps it): the
    policy with its adapters off when it has adapters, else a frozen deep copy."""
    if lora_layers(model):
        return AdaptersOff(model)
    return copy.deepcopy(model)


def export_weights(module: torch.nn.Module, weights: dict | None):
    """``(merged, adapter)``: plain HF weights with the adapters merged, and the adapter alone
    (PEFT keys), from ``weights`` (a ZeRO-3 consolidation) or the module's own. Without adapters:
    ``(weights, None)`` unchanged."""
    config = getattr(module, "remax_lora_config", None)
    if config is None:
        return weights, None
    state = weights if weights is not None else module.state_dict()
    scale = config.lora_alpha / config.r
    merged, adapter = {}, {}
    heads = tuple(f"{h}." for h in config.modules_to_save or ())
    for key, value in state.items():
        if f".lora_A.{ADAPTER}." in key or f".lora_B.{ADAPTER}." in key:
            adapter["base_model.model." + key.replace(f".{ADAPTER}.", ".")] = value
        elif ".base_layer." in key:
            plain = key.replace(".base_layer.", ".")
            merged[plain] = _merged(state, key, value, scale)
        else:
            merged[key] = value
            if key.startswith(heads):
                adapter["base_model.model." + key] = value
    return merged, adapter


def _merged(state: dict, key: str, weight: torch.Tensor, scale: float) -> torch.Tensor:
    if not key.endswith(".base_layer.weight"):
        return weight  # the bias: LoRA leaves it as it is
    stem = key[: -len(".base_layer.weight")]
    a, b = state[f"{stem}.lora_A.{ADAPTER}.weight"], state[f"{stem}.lora_B.{ADAPTER}.weight"]
    delta = (b.float() @ a.float()) * scale  # (out, r) @ (r, in), in fp32 as PEFT merges on CPU
    return (weight.float() + delta.to(weight.device)).to(weight.dtype)


def save_adapter(module: torch.nn.Module, adapter: dict, directory: Path) -> None:
    """``directory``: PEFT's ``adapter_config.json`` and ``adapter_model.safetensors``, which
    ``peft.PeftModel.from_pretrained(<base>, directory)`` loads."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    module.remax_lora_config.save_pretrained(directory)
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in adapter.items()}
    save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
