"""LoRA adapter counts for the memory planner (``remax.plan``): pure arithmetic, stdlib only.

A LoRA adapter on a linear layer W (in → out) adds A (in → r) and B (r → out), both bias-free:
r·(in + out) parameters per targeted linear, in every decoder layer (PEFT's ``LoraConfig``
matches ``target_modules`` against the end of each module's name, so ``q_proj`` targets every
layer's query projection). Shapes, per decoder layer, with h hidden, a heads, kv key/value heads,
hd = h / a, I the MLP width:

- Llama/Mistral: q_proj h → a·hd, k_proj and v_proj h → kv·hd, o_proj a·hd → h,
  gate_proj and up_proj h → I, down_proj I → h.
- OPT: q_proj, k_proj, v_proj, out_proj h → h, fc1 h → I, fc2 I → h.

The default targets are every attention and MLP projection (``model.lora.target_modules`` unset).
"""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
}
DEFAULT_TARGETS["mistral"] = DEFAULT_TARGETS["qwen2"] = DEFAULT_TARGETS["llama"]
"""Every attention and MLP projection (LoRA paper; QLoRA: all linear layers do best), per HF
``model_type``: the planner's count and the adapters ``remax.models.lora`` injects."""


def _family(model_type: str) -> str:
    return "opt" if model_type == "opt" else "llama"  # Mistral's layer is Llama's


def layer_linears(shape) -> dict[str, tuple[int, int]]:
    """Name → (in, out) features of each linear in one decoder layer of ``shape`` (a
    ``remax.plan.ModelShape``: ``model_type``, ``hidden_size``, ``num_heads``, ``num_kv_heads``,
    ``head_dim``, ``intermediate_size``)."""
    h, inter = shape.hidden_size, shape.intermediate_size
    if _family(shape.model_type) == "opt":
        return {
            **{name: (h, h) for name in ("q_proj", "k_proj", "v_proj", "out_proj")},
            "fc1": (h, inter),
            "fc2": (inter, h),
        }
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }


def targets_of(shape, target_modules: Sequence[str] | None = None) -> tuple[str, ...]:
    """The targeted linears: ``target_modules``, or the architecture's default when None.
    Raises ValueError naming the valid modules when one is not a linear of the decoder layer."""
    names = layer_linears(shape)
    targets = tuple(dict.fromkeys(target_modules or DEFAULT_TARGETS[_family(shape.model_type)]))
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise ValueError(
            f"model.lora.target_modules={list(targets)}: {unknown} is not a linear of a "
            f"{shape.model_type} decoder layer; the planner counts adapters on {', '.join(names)}"
        )
    return targets


def adapter_params(shape, rank: int, target_modules: Sequence[str] | None = None) -> int:
    """LoRA parameters of ``shape`` at rank ``rank``: L · Σ_targets r·(in + out); 0 at rank 0."""
    if rank <= 0:
        return 0
    linears = layer_linears(shape)
    per_layer = sum(rank * sum(linears[t]) for t in targets_of(shape, target_modules))
    return shape.num_layers * per_layer
