"""``export_policy=best_eval_reward`` (the release saves its best-eval-reward actor), made honest:

- the actor is chosen on *selection* prompts, held-out prompts after the first ``eval_prompts``,
  so the final evaluation (on the first ``eval_prompts``) reports on prompts the choice never saw
  (the release picks and reports on the same set, which inflates the reported reward);
- the final actor competes too (periodic evals never see it);
- the exported actor is loaded back before the final evaluation, so ``summary.json`` describes
  ``export/``, and the summary names its step.

The best weights live on disk (``best_policy.safetensors``), so a resumed run still knows them.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file

from remax import distributed
from remax.fileio import atomic_write
from remax.inputs import InputError

BEST_FILE = "best_policy.safetensors"
MIN_SELECTION = 64  # the same floor as eval_prompts: a choice on fewer is mostly noise


def selection_prompts(held_out: list[str], eval_prompts: int) -> list[str]:
    """Up to ``eval_prompts`` held-out prompts after the reported ones (a periodic eval then costs
    what it cost on the reported set); InputError when fewer than 64 remain."""
    rest = held_out[eval_prompts : 2 * eval_prompts]
    if len(rest) < MIN_SELECTION:
        raise InputError(
            f"data.num_eval={len(held_out)} held-out prompts leave {len(rest)} after "
            f"eval_prompts={eval_prompts}; export_policy=best_eval_reward selects on prompts the "
            f"final evaluation does not report: use data.num_eval >= eval_prompts + {MIN_SELECTION} "
            "(real data: at most 10% of the RL share is held out) or export_policy=last"
        )
    return rest


class BestActor:
    """The best step's actor: its selection reward, its step, and its weights on disk
    (``<run_dir>/best_policy.safetensors``). ``reward`` and ``step`` go into the trainer's
    checkpoint (``state_dict``); the weights file is the run dir's."""

    def __init__(self) -> None:
        self.run_dir: Path | None = None  # set when training starts (``before_training``)
        self.reward: float | None = None
        self.step: int | None = None

    def consider(self, step: int, reward: float, actor) -> bool:
        """Keep ``actor``'s weights (a ``remax.engines`` actor) when its selection ``reward`` at
        ``step`` beats the best so far (collective under ZeRO-3)."""
        if self.reward is not None and reward <= self.reward:
            return False
        self.reward, self.step = reward, step
        weights = actor.full_state_dict()  # collective under ZeRO-3
        if distributed.is_main():  # every rank has the same gathered results: rank 0 writes
            # A copy even on CPU, where ``.cpu()`` is the tensor itself: tied weights (an LM head
            # that is the input embedding) would reach safetensors as one storage, which it refuses.
            cpu = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in weights.items()}
            atomic_write(Path(self.run_dir) / BEST_FILE, lambda tmp: save_file(cpu, tmp))
        return True

    def load_into(self, model, rollout_engine, device) -> None:
        """Load the best weights into ``model`` on every rank, and tell the rollout engine: a vLLM
        engine holds its own copy of the weights (the last ones pushed), so without this the
        final evaluation would decode from the final actor while ``export/`` holds the best."""
        distributed.barrier()  # rank 0 wrote the file
        weights = load_file(Path(self.run_dir) / BEST_FILE, device=str(device))
        model.load_state_dict(weights)
        rollout_engine.weights_updated()

    def state_dict(self) -> dict:
        return {"best_eval_reward": self.reward, "best_step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.reward = state["best_eval_reward"]
        self.step = state.get("best_step")  # absent in checkpoints of earlier versions
