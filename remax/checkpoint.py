"""Atomic, resumable checkpoints and the HF export.

Layout: ``<run_dir>/checkpoints/step_<N>/`` holding ``model.safetensors`` (the trained model),
``state.pt`` (optimizer, scheduler, RNG, sampler, counters; plain tensors and Python values, loaded
with ``weights_only=True``) and a ``COMPLETE`` marker written last. Each checkpoint is written into
a temporary sibling directory, fsynced, and renamed: a ``kill -9`` at any moment (also mid-save)
leaves either the previous complete checkpoint or the new one, never a torn one. ``latest()`` only
considers directories with the marker; leftovers of an interrupted save are deleted on the next one.

The marker lists every file with its size and SHA-256, so a checkpoint that a disk, a copy or a
kill tore after the fact is found on resume: ``latest_intact()`` moves it to ``quarantine/`` and
falls back to the previous one. Publishing never deletes a complete checkpoint before its
replacement is in place (the old directory is renamed aside first), and a save first checks that
the disk has room for one more checkpoint of the last one's size.

Every leftover is recognisable by its name and removed at the next save and at the next start
(``latest_intact``): each is a whole checkpoint, ~94 GB at 7B. Pruning renames ``step_<K>`` to
``.trash_step_<K>`` before deleting it, so a kill mid-delete leaves a dotted name, never a
``step_<K>`` that is neither complete nor ever removed. ``quarantine/`` keeps only the newest torn
checkpoint (for a post-mortem) and is deleted when the disk is too full for the next save.

At world size N > 1 the same directory also holds ``state_rank<r>.pt`` for r = 1 … N−1 (each rank's
RNG state; everything else is identical across ranks and lives once in ``state.pt``). All ranks
write into one temporary directory; after a barrier rank 0 alone writes the marker, fsyncs and
renames, so the completion of a multi-rank checkpoint stays one atomic rename.

Under DeepSpeed (``deepspeed.enabled``) the weights, optimizer and scheduler are the engine's own
files in ``step_<N>/deepspeed/`` (each rank its ZeRO shards, written by the collective
``save_checkpoint``) instead of ``model.safetensors``; they complete under the same marker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from remax import distributed
from remax.fileio import replace_dir
from remax.models import lora

log = logging.getLogger("remax.checkpoint")

_STEP_DIR = re.compile(r"^step_(\d+)$")
MARKER = "COMPLETE"


def rng_state() -> dict:
    """Python, NumPy and torch (CPU and every CUDA device) RNG states as weights_only-safe values."""
    np_state = np.random.get_state()
    state = {
        "python": _to_lists(random.getstate()),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_to_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        (
            n["name"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, tuple | list) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def save_weights(model_state: dict[str, torch.Tensor], path: Path) -> None:
    # safetensors refuses shared storage (tied embeddings): save contiguous clones.
    save_file({k: v.detach().contiguous().cpu().clone() for k, v in model_state.items()}, path)


def _fsync_tree(root: Path) -> None:
    """Every file and directory under ``root`` (an engine's shards sit in subdirectories).

    Every rank walks the whole tree while the others may still be writing theirs: a temporary
    file that vanishes under the walk was renamed into place by its writer, which flushes it
    itself, so it is skipped here."""
    for directory, _, files in os.walk(root):
        for name in files:
            try:
                with open(Path(directory) / name, "rb") as fh:
                    os.fsync(fh.fileno())
            except FileNotFoundError:
                continue
        _fsync_dir(Path(directory))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:  # another rank's temporary directory, renamed meanwhile
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DiskFullError(OSError):
    """Not enough free space for the next checkpoint: a failure class of its own (stop, not retry)."""


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _manifest(root: Path) -> dict[str, dict]:
    """``{relative path: {"size", "sha256"}}`` of every file under ``root`` except the marker."""
    files = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = Path(directory) / name
            rel = str(path.relative_to(root))
            if rel != MARKER:
                files[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    return files


def verify(path: Path) -> str | None:
    """None when every file the marker lists is there with its size and hash, else the reason."""
    try:
        marker = json.loads((Path(path) / MARKER).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return f"unreadable marker: {exc}"
    for rel, want in marker.get("files", {}).items():  # markers before hashes list no files
        f = Path(path) / rel
        if not f.is_file():
            return f"{rel} missing"
        if f.stat().st_size != want["size"]:
            return f"{rel} has {f.stat().st_size} bytes, the marker says {want['size']}"
        if _sha256(f) != want["sha256"]:
            return f"{rel} does not match its SHA-256"
    return None


class CheckpointManager:
    """``step_<N>/`` directories under ``root``; keeps the newest ``keep_last`` complete ones."""

    def __init__(self, root: Path, keep_last: int = 2) -> None:
        self.root = Path(root)
        self.keep_last = keep_last

    def complete_steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        steps = []
        for d in self.root.iterdir():
            m = _STEP_DIR.match(d.name)
            if m and (d / MARKER).is_file():
                steps.append(int(m.group(1)))
        return sorted(steps)

    def latest(self) -> Path | None:
        steps = self.complete_steps()
        return self.root / f"step_{steps[-1]}" if steps else None

    def latest_intact(self) -> Path | None:
        """The newest complete checkpoint whose files match its marker; torn ones are moved to
        ``quarantine/`` (the newest kept for a post-mortem, out of ``latest()``'s way).

        Called once at the start of a run (rank 0, under the run dir's lease): it also removes
        what an interrupted save or prune left behind."""
        if self.root.is_dir():
            self._clean_stale()
        for step in reversed(self.complete_steps()):
            path = self.root / f"step_{step}"
            problem = verify(path)
            if problem is None:
                return path
            self._quarantine(path, problem)
        return None

    def _quarantine(self, path: Path, problem: str) -> None:
        """Move a torn checkpoint to ``quarantine/``; an older quarantined one is deleted."""
        quarantine = self.root / "quarantine"
        quarantine.mkdir(exist_ok=True)
        older = list(quarantine.iterdir())
        dest = quarantine / f"{path.name}-{int(time.time())}"
        os.replace(path, dest)
        for old in older:
            shutil.rmtree(old, ignore_errors=True)
        log.warning("checkpoint %s is corrupt (%s): moved to %s", path, problem, dest)

    def space_problem(self) -> str | None:
        """Why the disk cannot hold one more checkpoint of the last one's size (+ 10 %), or None."""
        latest = self.latest()
        if latest is None:
            return None
        try:
            files = json.loads((latest / MARKER).read_text()).get("files", {})
        except (OSError, json.JSONDecodeError):
            return None
        need = int(1.1 * sum(f["size"] for f in files.values()))
        free = shutil.disk_usage(self.root).free
        quarantine = self.root / "quarantine"
        if free < need and quarantine.is_dir():
            # A torn checkpoint kept for a post-mortem must not stop the run: it goes first.
            log.warning("too little space for the next checkpoint: deleting %s", quarantine)
            shutil.rmtree(quarantine, ignore_errors=True)
            free = shutil.disk_usage(self.root).free
        if free >= need:
            return None
        return (
            f"{self.root} has {free / 1e9:.2f} GB free, a checkpoint needs ~{need / 1e9:.2f} GB: "
            "free space or lower checkpoint.keep_last"
        )

    def save(
        self,
        step: int,
        model_state: dict[str, torch.Tensor] | None,
        state: dict,
        write: Callable[[Path], None] | None = None,
    ) -> Path:
        """Write ``step_<step>/`` atomically and prune older checkpoints.

        Called on every rank. At world size > 1, ranks other than 0 pass ``model_state=None`` and
        their own ``state`` (saved as ``state_rank<r>.pt``). ``model_state=None`` on rank 0: the
        weights are written by ``write(directory)``, which every rank calls (a DeepSpeed engine's
        collective ``save_checkpoint``) before the checkpoint is marked complete.
        """
        if distributed.world_size() > 1:
            return self._save_ranks(step, model_state, state, write)
        self.root.mkdir(parents=True, exist_ok=True)
        self._clean_stale()
        problem = self.space_problem()
        if problem:
            raise DiskFullError(problem)
        final = self.root / f"step_{step}"
        tmp = self.root / f".tmp_step_{step}_{os.getpid()}"
        tmp.mkdir()
        if model_state is not None:
            save_weights(model_state, tmp / "model.safetensors")
        torch.save(state, tmp / "state.pt")
        if write is not None:
            write(tmp)
        _fsync_tree(tmp)
        return self._publish(tmp, final, step)

    def _clean_stale(self) -> None:
        """Leftovers of an interrupted save, publish or prune (never a complete ``step_<N>``)."""
        for aside in self.root.glob(".step_*.old.*"):
            # A re-save killed between its two renames: the old copy is the only complete one.
            final = self.root / aside.name[1:].split(".old.")[0]
            if (aside / MARKER).is_file() and not final.exists():
                os.replace(aside, final)
        stale = [*self.root.glob(".tmp_step_*"), *self.root.glob(".step_*.old.*")]
        stale += self.root.glob(".trash_step_*")
        stale += [
            d for d in self.root.iterdir() if _STEP_DIR.match(d.name) and not (d / MARKER).is_file()
        ]
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)

    def _publish(self, tmp: Path, final: Path, step: int) -> Path:
        """Mark ``tmp`` complete and rename it to ``final`` (one atomic step); prune old ones."""
        marker = {"step": step, "files": _manifest(tmp)}
        (tmp / MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True))
        with open(tmp / MARKER, "rb") as fh:
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        replace_dir(tmp, final)  # a re-save: the complete one is renamed aside until replaced
        _fsync_dir(self.root)
        for old in self.complete_steps()[: -self.keep_last]:
            self._prune(self.root / f"step_{old}")
        log.info("checkpoint saved: %s", final)
        return final

    def _prune(self, path: Path) -> None:
        """Rename first: a kill mid-delete leaves ``.trash_step_<K>``, which the next save or start
        removes, never a torn ``step_<K>`` (nor one without its marker that nothing removes)."""
        trash = path.with_name(f".trash_{path.name}")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(path, trash)
        _fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)

    def _save_ranks(self, step: int, model_state, state: dict, write=None) -> Path:
        rank = distributed.rank()
        final = self.root / f"step_{step}"
        tmp = self.root / f".tmp_step_{step}"  # one name all ranks agree on (pids differ)
        problem = None
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            self._clean_stale()
            problem = self.space_problem()
            if not problem:
                tmp.mkdir()
        # Every rank raises together (no rank left waiting in a barrier for the timeout).
        if distributed.any_rank(problem is not None):
            raise DiskFullError(problem or "rank 0 found too little space for the checkpoint")
        if rank == 0:
            if model_state is not None:
                save_weights(model_state, tmp / "model.safetensors")
            torch.save(state, tmp / "state.pt")
        else:
            torch.save(state, tmp / f"state_rank{rank}.pt")
        if write is not None:
            write(tmp)  # collective: every rank writes its shards
        # Every rank flushes what it wrote (its shards may sit in its own page cache, on its own
        # node) before rank 0 hashes the files and writes the marker.
        _fsync_tree(tmp)
        distributed.barrier()
        if rank == 0:
            self._publish(tmp, final, step)
        distributed.barrier()  # nobody runs ahead of (or resumes from) a half-renamed checkpoint
        return final

    @staticmethod
    def load(path: Path, device, rank: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
        """Weights (None when an engine holds them) and state; rank r > 0 gets its own RNG state
        from ``state_rank<r>.pt``."""
        weights = Path(path) / "model.safetensors"
        model_state = load_file(weights, device=str(device)) if weights.is_file() else None
        return model_state, CheckpointManager.load_state(path, rank)

    @staticmethod
    def load_state(path: Path, rank: int = 0) -> dict:
        """``state.pt`` (counters, sampler, RNG); rank r > 0 gets its own RNG state."""
        state = torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=True)
        if rank > 0:
            own_file = Path(path) / f"state_rank{rank}.pt"
            own = torch.load(own_file, map_location="cpu", weights_only=True)
            state["rng"] = own["rng"]
        return state


def export_hf(model, tokenizer, export_dir: Path, meta: dict, state_dict=None) -> Path:
    """``save_pretrained`` (safetensors) of weights and tokenizer plus ``meta.json``, atomically.

    ``state_dict``: weights to save instead of the module's own (a ZeRO-3 consolidation, or the
    best actor kept on disk). An adapted model (``model.lora``) is saved merged, as the plain HF
    model the next stage loads, with the adapter alone in ``export/adapter/`` (PEFT's format).
    """
    export_dir = Path(export_dir)
    tmp = export_dir.with_name(f".tmp_{export_dir.name}_{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    state_dict, adapter = lora.export_weights(model, state_dict)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    if adapter is not None:
        lora.save_adapter(model, adapter, tmp / "adapter")
    tokenizer.save_pretrained(tmp)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    return replace_dir(tmp, export_dir)
