"""Sharded checkpoints: an index (``weight_map``: tensor → shard) or a directory of shards."""

from __future__ import annotations

import json
from pathlib import Path

from lipnorm.weights_io._safetensors import safetensors_entries
from lipnorm.weights_io._stored import (
    INDEX_SUFFIX,
    SUFFIXES,
    StoredTensor,
    WeightFileError,
    first_line,
)

__all__ = ["open_directory", "open_index"]


def open_directory(path: Path) -> dict[str, StoredTensor]:
    """A checkpoint directory: through its one index, else all its ``.safetensors`` shards."""
    indexes = sorted(path.glob(f"*{INDEX_SUFFIX}"))
    if len(indexes) > 1:
        names = ", ".join(index.name for index in indexes)
        raise WeightFileError(f"{path}: holds {len(indexes)} indexes ({names}); pass one of them")
    if indexes:
        return open_index(indexes[0])
    shards = sorted(shard for shard in path.glob("*.safetensors") if shard.is_file())
    if not shards:
        raise WeightFileError(
            f"{path}: a directory without .safetensors files or a *{INDEX_SUFFIX}; lipnorm "
            f"reads a directory of shards, or one file ({', '.join(SUFFIXES)})"
        )
    tensors: dict[str, StoredTensor] = {}
    for shard in shards:
        for name, entry in safetensors_entries(shard).items():
            if name in tensors:
                raise WeightFileError(
                    f"{shard}: tensor {name!r} is also in {tensors[name].file.name}; a directory "
                    f"of shards holds each tensor once (or pass its *{INDEX_SUFFIX})"
                )
            tensors[name] = entry
    return tensors


def open_index(path: Path) -> dict[str, StoredTensor]:
    """A sharded checkpoint through its index: ``{"weight_map": {tensor: shard file}}``."""
    try:
        index = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:  # JSON and Unicode errors are ValueErrors
        raise WeightFileError(f"{path}: not a readable JSON index ({first_line(exc)})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not (isinstance(weight_map, dict) and weight_map
            and all(isinstance(shard, str) and shard for shard in weight_map.values())):
        raise WeightFileError(
            f"{path}: not a safetensors index (it needs a \"weight_map\" from tensor names to "
            "shard files)"
        )
    shards = {}
    for shard_name in dict.fromkeys(weight_map.values()):
        shard = path.parent / shard_name
        if not shard.is_file():
            raise WeightFileError(f"{path}: names shard {shard_name!r}, which is missing ({shard})")
        shards[shard_name] = safetensors_entries(shard)
    tensors = {}
    for name, shard_name in weight_map.items():
        if name not in shards[shard_name]:
            raise WeightFileError(
                f"{path.parent / shard_name}: no tensor named {name!r}, which {path.name} "
                "places in this shard"
            )
        tensors[name] = shards[shard_name][name]
    return tensors
