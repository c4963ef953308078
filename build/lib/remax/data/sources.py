"""Load SFT demonstrations, preference pairs and RL prompts from the hub or local files.

Every loader returns a plain ``list`` of ``dict[str, str]`` (the same shape as
`remax.data.synthetic`): small, picklable, sliceable and splittable without a cache directory.
Wrap it with ``datasets.Dataset.from_list`` where ``.map`` is wanted.

=========================  ==========================================================
kind                       record
=========================  ==========================================================
`load_sft_records`         ``{"prompt", "response"}``
`load_preference_records`  ``{"prompt", "chosen", "rejected"}``
`load_prompt_records`      ``{"prompt"}``
=========================  ==========================================================

Text is returned raw: no chat template is applied here (that is `remax.data.templates`).

``source`` is one of

- an HF hub name (``Dahoas/rm-static``, ``Dahoas/full-hh-rlhf``,
  ``HuggingFaceH4/ultrafeedback_binarized``), read with ``load_dataset(name, split=split)``;
- a local ``.json`` (a list of objects or of strings; JSON lines also accepted), ``.jsonl``,
  ``.parquet`` or ``.txt`` (one prompt per line) file; ``split`` is ignored for single files;
- a local directory written by ``save_to_disk`` (a ``DatasetDict`` is indexed by ``split``) or a
  hub-repo folder (``hf download --repo-type dataset NAME --local-dir DIR``);
- a ``datasets.Dataset`` or a list of dicts / strings already in memory.

The schema (`DataFormat`) is detected from the columns; ``fmt`` overrides it. SFT and preference
records need ``hh`` or ``ultrafeedback`` data; prompts come from any format.

- ``hh`` (Dahoas): ``prompt`` already reads ``"\\n\\nHuman: ...\\n\\nAssistant:"``; ``chosen``,
  ``rejected``, ``response`` start with a space. The SFT response is ``chosen`` (DeepSpeed-Chat
  step 1 trains on ``prompt + chosen``), else ``response``.
- ``ultrafeedback``: ``chosen``/``rejected`` (or ``messages``) are lists of ``{role, content}``;
  the response is the last assistant message, the prompt the ``prompt`` column (else the last user
  message before it). Splits are ``train_prefs``/``test_prefs``/``train_sft``/...: pass ``split``.
- ``prompts``: ``prompt``; ``alpaca_eval``: ``instruction``; ``mt_bench``: ``turns[0]``.

Rows with a missing or empty field are skipped and counted in a warning (DeepSpeed-Chat skips
them too); a source with no usable row is an error.
"""

from __future__ import annotations

import enum
import itertools
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np

logger = logging.getLogger(__name__)

Record = dict[str, str]
Source = str | os.PathLike | datasets.Dataset | list


class DataFormat(str, enum.Enum):
    hh = "hh"
    ultrafeedback = "ultrafeedback"
    prompts = "prompts"
    alpaca_eval = "alpaca_eval"
    mt_bench = "mt_bench"


FORMAT_HELP = {
    DataFormat.hh: "hh (prompt + chosen/rejected/response strings, Dahoas)",
    DataFormat.ultrafeedback: "ultrafeedback (chosen/rejected/messages as lists of {role, content})",
    DataFormat.prompts: "prompts (prompt; or a .txt / JSON list of strings)",
    DataFormat.alpaca_eval: "alpaca_eval (instruction)",
    DataFormat.mt_bench: "mt_bench (turns)",
}
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".txt")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Columns each (kind, format) needs: every group must have at least one of its names present.
_SFT, _PREF, _PROMPT = "sft", "preference", "prompt"
_REQUIRED: dict[tuple[str, DataFormat], tuple[tuple[str, ...], ...]] = {
    (_SFT, DataFormat.hh): (("prompt",), ("chosen", "response")),
    (_SFT, DataFormat.ultrafeedback): (("chosen", "messages"),),
    (_PREF, DataFormat.hh): (("prompt",), ("chosen",), ("rejected",)),
    (_PREF, DataFormat.ultrafeedback): (("chosen",), ("rejected",)),
    (_PROMPT, DataFormat.hh): (("prompt",),),
    (_PROMPT, DataFormat.ultrafeedback): (("prompt", "chosen", "messages"),),
    (_PROMPT, DataFormat.prompts): (("prompt",),),
    (_PROMPT, DataFormat.alpaca_eval): (("instruction",),),
    (_PROMPT, DataFormat.mt_bench): (("turns",),),
}


def load_sft_records(
    source: Source,
    *,
    split: str = "train",
    fmt: DataFormat | str | None = None,
    limit: int | None = None,
) -> list[Record]:
    """SFT demonstrations ``{"prompt", "response"}`` from hh or ultrafeedback data."""
    return _load(source, _SFT, split=split, fmt=fmt, limit=limit)


def load_preference_records(
    source: Source,
    *,
    split: str = "train",
    fmt: DataFormat | str | None = None,
    limit: int | None = None,
) -> list[Record]:
    """Preference pairs ``{"prompt", "chosen", "rejected"}`` from hh or ultrafeedback data."""
    return _load(source, _PREF, split=split, fmt=fmt, limit=limit)


def load_prompt_records(
    source: Source,
    *,
    split: str = "train",
    fmt: DataFormat | str | None = None,
    limit: int | None = None,
) -> list[Record]:
    """RL / evaluation prompts ``{"prompt"}`` from any supported format."""
    return _load(source, _PROMPT, split=split, fmt=fmt, limit=limit)


def detect_format(columns: Sequence[str], first_row: dict[str, Any]) -> DataFormat:
    """The `DataFormat` of rows with these ``columns``; ValueError when none fits."""
    cols = set(columns)
    conversation = next((first_row.get(c) for c in ("chosen", "messages") if c in cols), None)
    if isinstance(conversation, list):
        return DataFormat.ultrafeedback
    if "prompt" in cols and cols & {"chosen", "rejected", "response"}:
        return DataFormat.hh
    if "turns" in cols:
        return DataFormat.mt_bench
    if "instruction" in cols:
        return DataFormat.alpaca_eval
    if "prompt" in cols:
        return DataFormat.prompts
    raise ValueError(
        f"cannot tell the data format from columns {sorted(cols)}; accepted: "
        + "; ".join(FORMAT_HELP.values())
    )


def split_indices(
    n: int, fractions: Sequence[float] | str = (2, 4, 4), *, stage_index: int, seed: int
) -> list[int]:
    """Row indices of stage ``stage_index`` under DeepSpeed-Chat's ``--data_split`` rule.

    Same arithmetic as DeepSpeed-Chat ``get_raw_dataset_split_index``: normalise the weights, cut
    cumulative ``round(fraction * n)`` boundaries, shift them so the last equals ``n``, and slice a
    ``np.random.RandomState(seed)`` permutation of ``range(n)``. The stages are disjoint and cover
    every row only if all stages pass the same ``seed``.
    """
    weights = _parse_fractions(fractions)
    if not 0 <= stage_index < len(weights):
        raise ValueError(
            f"stage_index={stage_index} is out of range for {len(weights)} split weights {weights}"
        )
    total = sum(weights)
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + int(round(w / total * float(n))))
    diff = bounds[-1] - n
    bounds = [0] + [b - diff for b in bounds[1:]]
    if any(lo > hi for lo, hi in zip(bounds, bounds[1:])):
        raise ValueError(f"split weights {weights} give no valid cut of {n} rows: bounds {bounds}")
    dtype = np.uint32 if n < np.iinfo(np.uint32).max - 1 else np.int64
    order = np.arange(n, dtype=dtype)
    np.random.RandomState(seed).shuffle(order)
    return order[bounds[stage_index] : bounds[stage_index + 1]].tolist()


def split_fractions(
    records: Sequence[Any] | datasets.Dataset,
    fractions: Sequence[float] | str = (2, 4, 4),
    *,
    stage_index: int,
    seed: int,
) -> Any:
    """Stage ``stage_index``'s share of ``records`` (0 SFT, 1 RM, 2 RL for ``2,4,4``), shuffled.

    Reproduces DeepSpeed-Chat's ``--data_split 2,4,4`` (20% / 40% / 40%, disjoint, deterministic by
    ``seed``; see `split_indices`). DeepSpeed-Chat splits the train and eval splits separately:
    call this once per split. Every stage must pass the same ``seed`` (``data.seed``): DeepSpeed-Chat
    seeds the permutation with the stage's training ``--seed``, and the release's OPT scripts pass
    2023 (SFT, RL) but 1234 (RM), so its RM share comes from another permutation and overlaps the
    SFT and RL shares **(UV)**.
    Returns a list, or a ``datasets.Dataset`` when given one.
    """
    indices = split_indices(len(records), fractions, stage_index=stage_index, seed=seed)
    if isinstance(records, datasets.Dataset):
        return records.select(indices)
    return [records[i] for i in indices]


# --------------------------------------------------------------------------- loading


def _load(
    source: Source, kind: str, *, split: str, fmt: DataFormat | str | None, limit: int | None
) -> list[Record]:
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit}: use a positive number of rows or None for all")
    label, columns, rows = _read(source, split)
    rows = iter(rows)
    first = next(rows, None)
    if first is None:
        raise ValueError(f"{label}: no rows")
    fmt = _as_format(fmt) if fmt is not None else detect_format(columns, first)
    _check_columns(label, kind, fmt, columns)
    extract = _EXTRACTORS[kind]
    records: list[Record] = []
    seen = 0
    for row in itertools.chain([first], rows):
        seen += 1
        record = extract(fmt, row)
        if all(isinstance(v, str) and v.strip() for v in record.values()):
            records.append(record)
            if limit is not None and len(records) >= limit:
                break
    if not records:
        raise ValueError(
            f"{label}: none of {seen} rows gave a {kind} record as format {fmt.value}; "
            f"columns seen {sorted(columns)}"
        )
    if len(records) < seen:
        logger.warning(
            "%s: skipped %d of %d rows with a missing or empty field",
            label,
            seen - len(records),
            seen,
        )
    return records


def _as_format(fmt: DataFormat | str) -> DataFormat:
    try:
        return DataFormat(fmt)
    except ValueError:
        valid = ", ".join(f.value for f in DataFormat)
        raise ValueError(f"unknown data format {fmt!r}; valid: {valid}") from None


def _check_columns(label: str, kind: str, fmt: DataFormat, columns: Sequence[str]) -> None:
    required = _REQUIRED.get((kind, fmt))
    if required is None:
        usable = sorted({f.value for k, f in _REQUIRED if k == kind})
        raise ValueError(
            f"{label}: format {fmt.value} has no {kind} data; {kind} records need one of {usable}"
        )
    missing = [" or ".join(group) for group in required if not set(group) & set(columns)]
    if missing:
        raise ValueError(
            f"{label}: {kind} records as format {fmt.value} need column {', '.join(missing)}; "
            f"columns seen {sorted(columns)}; accepted: " + "; ".join(FORMAT_HELP.values())
        )


# --------------------------------------------------------------------------- per-format fields


def _last_assistant(conversation: Any) -> tuple[str | None, str | None]:
    """(last assistant message, last user message before it) of a ``{role, content}`` list."""
    if not isinstance(conversation, list) or not conversation:
        return None, None
    last = conversation[-1]
    if not isinstance(last, dict) or last.get("role") != "assistant":
        return None, None
    user = next(
        (
            m.get("content")
            for m in reversed(conversation[:-1])
            if isinstance(m, dict) and m.get("role") == "user"
        ),
        None,
    )
    return last.get("content"), user


def _prompt_of(fmt: DataFormat, row: dict[str, Any]) -> str | None:
    if fmt is DataFormat.alpaca_eval:
        return row.get("instruction")
    if fmt is DataFormat.mt_bench:
        turns = row.get("turns")
        return turns[0] if isinstance(turns, list) and turns else None
    if fmt is DataFormat.ultrafeedback and not row.get("prompt"):
        return _last_assistant(row.get("chosen") or row.get("messages"))[1]
    return row.get("prompt")


def _sft_record(fmt: DataFormat, row: dict[str, Any]) -> dict[str, Any]:
    if fmt is DataFormat.hh:
        response = row.get("chosen") or row.get("response")
    else:
        response = _last_assistant(row.get("chosen") or row.get("messages"))[0]
    return {"prompt": _prompt_of(fmt, row), "response": response}


def _preference_record(fmt: DataFormat, row: dict[str, Any]) -> dict[str, Any]:
    if fmt is DataFormat.hh:
        chosen, rejected = row.get("chosen"), row.get("rejected")
    else:
        chosen = _last_assistant(row.get("chosen"))[0]
        rejected = _last_assistant(row.get("rejected"))[0]
    return {"prompt": _prompt_of(fmt, row), "chosen": chosen, "rejected": rejected}


def _prompt_record(fmt: DataFormat, row: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": _prompt_of(fmt, row)}


_EXTRACTORS = {_SFT: _sft_record, _PREF: _preference_record, _PROMPT: _prompt_record}


# --------------------------------------------------------------------------- reading sources


def _read(source: Source, split: str) -> tuple[str, list[str], Iterable[dict[str, Any]]]:
    """(label for messages, column names, rows as dicts) of any supported source."""
    if isinstance(source, datasets.DatasetDict):
        source = _pick_split(source, split, "DatasetDict")
    if isinstance(source, datasets.Dataset):
        return "in-memory Dataset", list(source.column_names), source
    if isinstance(source, list | tuple):
        return "in-memory list", *_rows_of(list(source), "in-memory list")
    path = Path(source).expanduser()
    if path.exists():
        return _read_local(path, split)
    text = os.fspath(source)
    if _HUB_NAME.match(text) and path.suffix not in LOCAL_SUFFIXES:
        ds = _load_dataset(text, split)
        return text, list(ds.column_names), ds
    raise FileNotFoundError(
        f"data source not found: {path.resolve()} (from {text!r}); fix the path, or give a hub "
        f"dataset as owner/name (e.g. Dahoas/rm-static)"
    )


def _read_local(path: Path, split: str) -> tuple[str, list[str], Iterable[dict[str, Any]]]:
    label = str(path)
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = _pick_split(ds, split, label)
        else:  # a hub-repo folder (data/*.parquet, *.jsonl, ...) as `hf download --local-dir` writes
            ds = _load_dataset(str(path), split, local=True)
        return label, list(ds.column_names), ds
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        ds = datasets.Dataset.from_parquet(str(path))
        return label, list(ds.column_names), ds
    if suffix == ".txt":
        lines = path.read_text(encoding="utf-8").splitlines()
        return label, ["prompt"], [{"prompt": line} for line in lines if line.strip()]
    if suffix == ".jsonl":
        return label, *_rows_of(_json_lines(path), label)
    if suffix == ".json":
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = _json_lines(path)  # JSON lines saved as .json (HF to_json writes these)
        if not isinstance(data, list):
            keys = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{label}: expected a JSON list of objects or strings, got {keys}")
        return label, *_rows_of(data, label)
    raise ValueError(
        f"{label}: unsupported file type {suffix!r}; use one of {list(LOCAL_SUFFIXES)} "
        "or a save_to_disk directory"
    )


def _json_lines(path: Path) -> list[Any]:
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return rows


def _rows_of(data: list[Any], label: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and dict rows of a list of dicts or of strings (strings become prompts)."""
    if data and all(isinstance(x, str) for x in data):
        return ["prompt"], [{"prompt": x} for x in data]
    if not all(isinstance(x, dict) for x in data):
        bad = next(type(x).__name__ for x in data if not isinstance(x, dict))
        raise ValueError(
            f"{label}: expected rows that are all objects or all strings, found a {bad}"
        )
    return (list(data[0]) if data else []), data


def _pick_split(dd: datasets.DatasetDict, split: str, label: str) -> datasets.Dataset:
    if split not in dd:
        raise ValueError(f"{label} has no split {split!r}; splits: {sorted(dd)}; pass split=...")
    return dd[split]


def _load_dataset(name: str, split: str, *, local: bool = False) -> datasets.Dataset:
    """``load_dataset(name, split=split)`` with one-line errors for a bad split or no hub access."""
    try:
        return datasets.load_dataset(name, split=split)
    except ValueError as e:
        if "split" not in str(e).lower():
            raise
        raise ValueError(f"{name}: {str(e).splitlines()[0]}; pass split=...") from e
    except Exception as e:
        if local:
            raise
        offline = datasets.config.HF_HUB_OFFLINE or datasets.config.HF_DATASETS_OFFLINE
        why = (
            "offline mode (HF_HUB_OFFLINE=1) and not cached" if offline else str(e).splitlines()[0]
        )
        raise ConnectionError(
            f"cannot load hub dataset {name!r} ({why}); no local path {name!r} exists either. "
            f"Pre-download it on a login node with `huggingface-cli download --repo-type dataset "
            f"{name} --local-dir DIR` (`hf download` in newer huggingface_hub) and pass DIR, "
            "or pass a local .json/.jsonl/.parquet/.txt path"
        ) from e


def _parse_fractions(fractions: Sequence[float] | str) -> list[float]:
    try:
        parts = fractions.split(",") if isinstance(fractions, str) else list(fractions)
        weights = [float(w) for w in parts]
    except (TypeError, ValueError):
        weights = []
    if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(
            f"split weights {fractions!r}: give non-negative numbers with a positive sum, e.g. 2,4,4"
        )
    return weights
