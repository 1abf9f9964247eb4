"""On-disk embedding cache and process sharding for evaluation.

:class:`CachedEncoder` wraps a model's ``encode``. Every call is keyed by

* a **model fingerprint**: a hash of the embedding config plus, for every parameter, its
  name, shape, dtype, the float64 sum of all its values and a strided sample of up to 4,096
  values (:func:`model_fingerprint`). Hashing the live weights, instead of file names or
  mtimes, means a ``tiny:`` model, a saved folder and an in-memory model all get a key, and
  a retrained model in the same folder never reuses stale embeddings;
* a **data fingerprint**: a hash of the items in order (text, image paths with their size and
  mtime, in-memory image pixels) and the instruction (:func:`data_fingerprint`).

A hit loads ``CACHE_DIR/<model fp>/<data fp>.safetensors`` and never calls the model. Under
``accelerate launch`` (a process group with more than one process), a miss is split across
processes: each encodes a strided slice of the items and the slices are gathered, so every
process ends with the full ``[n, d]`` matrix; only the main process writes the cache file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["CacheStats", "CachedEncoder", "data_fingerprint", "default_cache_dir", "model_fingerprint"]

# Config fields added after caches existed, left out of the key at these defaults so that
# entries written before them stay valid.
_LATER_DEFAULTS = {"multivector_dim": None, "dense_head": True, "multivector_tokens": "all"}

# Per-parameter sample size for the fingerprint: cheap even for billions of weights, and with
# the full-tensor sum any real training step changes the key.
_SAMPLE = 4096


def default_cache_dir() -> Path:
    """``$VLM2EMB_CACHE`` if set, else ``$XDG_CACHE_HOME/vlm2emb/embeddings`` (``~/.cache``)."""
    if os.environ.get("VLM2EMB_CACHE"):
        return Path(os.environ["VLM2EMB_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "vlm2emb" / "embeddings"


def model_fingerprint(model: Any) -> str:
    """A hex key identifying a model's weights and embedding settings.

    Args:
        model: An ``nn.Module`` (usually an :class:`~vlm2emb.model.EmbeddingModel`); its
            ``config`` attribute, if a dataclass, is part of the key (pooling, normalisation...).

    Returns:
        A 20-character hex string.
    """
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if is_dataclass(config):
        # temperature and base_model do not change embeddings; leave them out of the key.
        settings = {
            k: v
            for k, v in asdict(config).items()
            if k not in ("temperature", "base_model")
            and (k not in _LATER_DEFAULTS or v != _LATER_DEFAULTS[k])
        }
        h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in list(model.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
            if flat.numel() == 0 or not (flat.is_floating_point() or flat.dtype == torch.int64):
                continue
            step = max(1, flat.numel() // _SAMPLE)
            sample = flat[::step][:_SAMPLE].double().cpu()
            h.update(repr(float(flat.double().sum())).encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:20]


def _value_for_hash(value: Any) -> Any:
    """A JSON-able, content-identifying form of an item field."""
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        # Image paths: the file's identity (size + mtime) too, so an edited image is re-encoded.
        if isinstance(value, os.PathLike) or (len(str(value)) < 4096 and path.is_file()):
            try:
                st = path.stat()
                return {"path": str(path), "size": st.st_size, "mtime": st.st_mtime_ns}
            except OSError:
                pass
        return str(value)
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": hashlib.sha256(value).hexdigest()}
    if isinstance(value, (list, tuple)):
        return [_value_for_hash(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _value_for_hash(v) for k, v in sorted(value.items()) if v is not None}
    if hasattr(value, "tobytes") and hasattr(value, "size"):  # PIL image: hash the pixels
        return {"pixels": hashlib.sha256(value.tobytes()).hexdigest(), "size": list(value.size)}
    return repr(value)


def data_fingerprint(items: list[Any], instruction: str | None) -> str:
    """A hex key identifying ``items`` (in order) encoded under ``instruction``."""
    h = hashlib.sha256()
    h.update(json.dumps({"instruction": instruction, "n": len(items)}).encode())
    for item in items:
        h.update(json.dumps(_value_for_hash(item), sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest()[:24]


@dataclass
class CacheStats:
    """Counters over the encoder's lifetime (reported as ``report["cache"]``)."""

    hits: int = 0
    misses: int = 0
    items_encoded: int = 0
    items_from_cache: int = 0
    processes: int = 1  # processes that shared the encoding of misses


class CachedEncoder:
    """A drop-in ``encode`` that reads and writes an embedding cache and shards misses.

    Args:
        model: Anything with ``encode(items, instruction=..., batch_size=..., show_progress_bar=...)``.
        cache_dir: Cache root; ``None`` disables caching (sharding still applies).
        fingerprint: Model key; computed with :func:`model_fingerprint` when omitted.
        shard: Split misses across processes when a process group is active.
    """

    def __init__(
        self,
        model: Any,
        cache_dir: str | os.PathLike[str] | None = None,
        *,
        fingerprint: str | None = None,
        shard: bool = True,
    ) -> None:
        self.model = model
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self.fingerprint = fingerprint
        if self.cache_dir is not None and self.fingerprint is None:
            self.fingerprint = model_fingerprint(model)
        self.shard = shard
        self.stats = CacheStats()

    def _path(self, items: list[Any], instruction: str | None, output: str = "dense") -> Path | None:
        if self.cache_dir is None:
            return None
        # Dense entries keep their pre-multivector names, so existing caches stay valid.
        suffix = "" if output == "dense" else f".{output}"
        return (
            self.cache_dir
            / str(self.fingerprint)
            / f"{data_fingerprint(items, instruction)}{suffix}.safetensors"
        )

    def encode(
        self,
        items: list[Any],
        instruction: str | None = None,
        batch_size: int = 32,
        show_progress_bar: bool = False,
        output: str = "dense",
    ) -> Any:
        """Embeddings ``[len(items), d]`` (float32, CPU), from the cache when possible.

        With ``output="multivector"`` (a model with a multi-vector head): a list of
        ``[L_i, D]`` token sets, stored as one padded tensor plus the lengths.
        """
        from safetensors.torch import load_file, save_file

        from vlm2emb.distributed import rank_and_world

        items = list(items)
        path = self._path(items, instruction, output)
        rank, world = rank_and_world() if self.shard else (0, 1)
        cached = _read_entry(path, len(items), load_file) if path is not None and path.is_file() else None
        hit = cached is not None
        if world > 1:
            from vlm2emb.distributed import all_true

            # Every process must take the same branch, or the gather below would hang.
            hit = all_true(hit, _collective_device())
        if hit and cached is not None:
            self.stats.hits += 1
            self.stats.items_from_cache += len(items)
            return cached
        self.stats.misses += 1
        self.stats.items_encoded += len(items)
        self.stats.processes = max(self.stats.processes, world)
        # Only a non-default output is passed on: plain encoders need not know the keyword.
        extra = {} if output == "dense" else {"output": output}
        if world > 1:
            emb = _sharded_encode(self.model, items, instruction, batch_size, rank, world, extra)
        else:
            emb = self.model.encode(
                items,
                instruction=instruction,
                batch_size=batch_size,
                show_progress_bar=show_progress_bar,
                **extra,
            )
        emb = _as_stored(emb)
        if path is not None and rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
            save_file(_file_tensors(emb), str(tmp), metadata={"instruction": str(instruction)})
            os.replace(tmp, path)  # readers never see a half-written file
        return emb


def _as_stored(emb: Any) -> Any:
    """float32 CPU contiguous: a [n, d] tensor, or each [L_i, D] token set of a list."""
    if isinstance(emb, list):
        return [torch.as_tensor(t).detach().float().cpu().contiguous() for t in emb]
    return torch.as_tensor(emb).detach().float().cpu().contiguous()


def _file_tensors(emb: Any) -> dict[str, torch.Tensor]:
    """What a cache file holds: ``embeddings`` [n, d], or padded ``tokens`` [n, L, D] + ``lengths`` [n]."""
    if not isinstance(emb, list):
        return {"embeddings": emb}
    from vlm2emb.multivector import pad_token_sets

    tokens, _ = pad_token_sets(emb) if emb else (torch.empty(0, 0, 0), None)
    return {"tokens": tokens.contiguous(), "lengths": torch.tensor([len(t) for t in emb], dtype=torch.int64)}


def _from_file(tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`_file_tensors`."""
    if "tokens" not in tensors:
        return tensors["embeddings"]
    return [t[: int(n)] for t, n in zip(tensors["tokens"], tensors["lengths"])]


def _read_entry(path: Path, n_items: int, load_file: Any) -> Any:
    """A cache entry's embeddings ``[n, d]``, or None (with a warning) when it is unusable.

    A cache is only a shortcut: an entry cut short by a full disk, overwritten by hand, or
    holding the wrong number of rows is recomputed (and rewritten), never a failed run.
    """
    import warnings

    try:
        emb = _from_file(load_file(str(path)))
        problem = None
        if isinstance(emb, list):
            if len(emb) != n_items:
                problem = f"holds {len(emb)} token sets for {n_items} items"
            elif not all(bool(torch.isfinite(t).all()) for t in emb):
                problem = "holds non-finite values"
        elif emb.ndim != 2 or emb.shape[0] != n_items:
            problem = f"holds shape {tuple(emb.shape)} for {n_items} items"
        elif not bool(torch.isfinite(emb).all()):
            problem = "holds non-finite values"
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        problem = (
            f"cannot be read ({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})"
        )
    if problem is None:
        return emb
    warnings.warn(f"embedding cache entry {path} {problem}; recomputing it", stacklevel=3)
    return None


def _collective_device() -> torch.device:
    import torch.distributed as dist

    # NCCL only moves CUDA tensors; gloo moves CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _sharded_encode(
    model: Any,
    items: list[Any],
    instruction: str | None,
    batch_size: int,
    rank: int,
    world: int,
    extra: dict[str, Any] | None = None,
) -> Any:
    """Each process encodes items ``rank, rank + world, ...``; all processes get every row
    (a [n, d] tensor, or a list of token sets for ``extra={"output": "multivector"}``)."""
    import torch.distributed as dist

    local_idx = list(range(rank, len(items), world))
    local = [items[i] for i in local_idx]
    emb = (
        _as_stored(model.encode(local, instruction=instruction, batch_size=batch_size, **(extra or {})))
        if local
        else None
    )
    parts: list[Any] = [None] * world
    # Object gather: slices differ in length by one, and gloo/NCCL tensor gathers need equal shapes.
    dist.all_gather_object(parts, (local_idx, emb))
    if any(isinstance(p[1], list) for p in parts):
        sets: list[Any] = [None] * len(items)
        for idx, part in parts:
            for i, t in zip(idx, part or []):
                sets[i] = t
        return sets
    dim = next(p[1].shape[1] for p in parts if p[1] is not None)
    out = torch.empty(len(items), dim)  # [n, d]
    for idx, part in parts:
        if part is not None:
            out[torch.tensor(idx)] = part
    return out
