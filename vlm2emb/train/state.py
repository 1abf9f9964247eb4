"""Training state on disk without pickle: optimizer, LR scheduler, RNG, checkpoint manifests.

accelerate's ``save_state`` writes the registered LR scheduler and the RNG states with
``torch.save`` and reads them back with ``weights_only=False``: a file planted in a run
folder would run code on resume. Everything the trainer restores is stored here instead as
safetensors (tensors) plus JSON (everything else), and read back without unpickling:

    state/model.safetensors        the trainable model's state dict (``safetensors.torch.save_model``)
    state/optimizer.safetensors    the optimizer's state dict: tensors + a JSON tree in the metadata
    state/scheduler.json           the LR scheduler's state dict
    state/rng-RANK.safetensors     Python, NumPy, torch (and CUDA) RNG states of each process
    manifest.json                  size and SHA-256 of every file of the checkpoint, written last

``verify_checkpoint`` checks a checkpoint against its manifest, so a truncated or damaged
file is found before anything is loaded (and ``find_checkpoint`` can fall back to an older,
whole checkpoint).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import math
import os
import pickle
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FORMAT = "vlm2emb-state-1"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file at fault."""


# ---------------------------------------------------------------- pickle-free trees
def _encode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """Turns a state dict into JSON data, moving its tensors into ``tensors``."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        # A copy: safetensors refuses tensors that share storage, and views of larger buffers.
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        # JSON has no NaN/inf; repr() round-trips every float exactly.
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        # Keys may be ints (optimizer state is keyed by parameter index): keep them as pairs.
        return {
            "__dict__": [
                [_encode(k, tensors, where), _encode(v, tensors, f"{where}.{k}")] for k, v in obj.items()
            ]
        }
    raise TypeError(f"{where}: cannot store a {type(obj).__name__} without pickle")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__float__" in obj:
            return float(obj["__float__"])
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
        raise ValueError(f"unknown entry {sorted(obj)}")
    return obj


def save_tree(path: Path, obj: Any) -> None:
    """Writes nested dicts/lists/tuples of tensors and plain values as one safetensors file."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(obj, tensors, path.name)
    save_file(tensors, str(path), metadata={"format": STATE_FORMAT, "tree": json.dumps(tree)})


def load_tree(path: Path, device: torch.device | str = "cpu") -> Any:
    """Reads a file written by :func:`save_tree` (no unpickling).

    Raises:
        CheckpointError: The file is missing, truncated or not a vlm2emb state file.
    """
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("format") != STATE_FORMAT:
                raise CheckpointError(f"{path}: not a {STATE_FORMAT} file")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
        return _decode(json.loads(meta["tree"]), tensors)
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise CheckpointError(
            f"{path}: unreadable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from None


# ---------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch and CUDA RNG states, as storable data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], source: Path) -> None:
    """Restores what :func:`rng_state` captured.

    Raises:
        CheckpointError: The state is malformed (names ``source``).
    """
    try:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        n = state["numpy"]
        np.random.set_state(
            (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
        )
        torch.set_rng_state(state["torch"].to(torch.uint8))
        if torch.cuda.is_available():
            if "cuda" not in state:
                raise ValueError("no CUDA RNG state (written on a machine without CUDA)")
            torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in state["cuda"]])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{source}: not a valid RNG state ({exc})") from None


def rng_file(state_dir: Path, rank: int) -> Path:
    """Where process ``rank`` keeps its RNG state."""
    return state_dir / f"rng-{rank}.safetensors"


# ---------------------------------------------------------------- atomic small files
# The packages whose versions decide what a checkpoint computes (recorded in trainer_state.json
# and the model card).
VERSIONED_PACKAGES = ("vlm2emb", "torch", "transformers", "peft", "accelerate", "deepspeed")


def library_versions() -> dict[str, str]:
    """Installed versions of ``VERSIONED_PACKAGES`` (those not installed are left out)."""
    from importlib.metadata import PackageNotFoundError, version

    import vlm2emb

    found = {"vlm2emb": vlm2emb.__version__}
    for name in VERSIONED_PACKAGES[1:]:
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


def write_text_atomic(path: Path, text: str) -> None:
    """Writes ``text`` beside ``path`` and renames it into place (never a half-written file)."""
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    """Reads a JSON file of a checkpoint.

    Raises:
        CheckpointError: The file is missing or not valid JSON.
    """
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from None


# ---------------------------------------------------------------- DeepSpeed
# The only non-tensor objects DeepSpeed's ZeRO checkpoints hold (checked for ZeRO-2 and -3):
# plain data classes and enums that rebuild without running code.
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


@contextlib.contextmanager
def deepspeed_weights_only(engine: Any) -> Iterator[None]:
    """Makes a DeepSpeed engine read its checkpoint files with ``weights_only=True``.

    DeepSpeed's own partitioned model and optimizer files are ``torch.save`` pickles, which
    its checkpoint engine loads with ``weights_only=False``. Inside this block the engine's
    loader accepts tensors, plain containers and the classes in ``DEEPSPEED_SAFE_GLOBALS``
    only, so a planted file cannot run code.

    Raises:
        CheckpointError: A file holds anything else (names it).
    """
    allowed = []
    for dotted in DEEPSPEED_SAFE_GLOBALS:
        module, name = dotted.rsplit(".", 1)
        with contextlib.suppress(ImportError, AttributeError):
            allowed.append(getattr(importlib.import_module(module), name))
    checkpoint_engine = engine.checkpoint_engine

    def load(path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(allowed):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError:
                raise CheckpointError(
                    f"{path}: holds objects other than tensors and DeepSpeed's plain state; not unpickled"
                ) from None

    checkpoint_engine.load = load  # an instance attribute shadows the method
    try:
        yield
    finally:
        del checkpoint_engine.load


# ---------------------------------------------------------------- manifests
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(checkpoint: Path) -> None:
    """Records size and SHA-256 of every file under ``checkpoint`` (call it last)."""
    files = {
        p.relative_to(checkpoint).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(checkpoint.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    write_text_atomic(
        checkpoint / MANIFEST, json.dumps({"format": STATE_FORMAT, "files": files}, indent=1) + "\n"
    )


def verify_checkpoint(checkpoint: Path) -> None:
    """Checks every file of a checkpoint against its manifest.

    Raises:
        CheckpointError: Naming the first missing, truncated or altered file (or the manifest).
    """
    if not (checkpoint / MANIFEST).is_file():
        raise CheckpointError(
            f"{checkpoint / MANIFEST}: missing (a checkpoint of an older vlm2emb, whose pickled state "
            "is not loaded, or not a whole checkpoint)"
        )
    manifest = read_json(checkpoint / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != STATE_FORMAT:
        raise CheckpointError(
            f"{checkpoint / MANIFEST}: not a {STATE_FORMAT} manifest (a checkpoint of an older vlm2emb, "
            "whose pickled state is not loaded)"
        )
    for name, entry in manifest["files"].items():
        path = checkpoint / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        size = path.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(f"{path}: {size} bytes, expected {entry['size']} (truncated or replaced)")
        if _sha256(path) != entry["sha256"]:
            raise CheckpointError(f"{path}: contents differ from the manifest (damaged)")
