"""Weight files: a model's state dict saved as safetensors, and read back from safetensors or a
torch state dict (what ``initializer=pretrained`` starts from)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save, save_file
from torch import Tensor, nn

from pipeline.config import ConfigError, one_line


def save_weights(model: nn.Module, path: str | Path) -> None:
    """Write ``model.state_dict()`` to a safetensors file (creating its directory)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(_saveable(model), str(path))


def weights_bytes(model: nn.Module) -> bytes:
    """``model.state_dict()`` as the content of a safetensors file."""
    return save(_saveable(model))


def _saveable(model: nn.Module) -> dict[str, Tensor]:
    # clone: safetensors refuses tensors that share storage (tied weights) or are not contiguous.
    return {key: value.detach().cpu().contiguous().clone() for key, value in model.state_dict().items()}


def load_weights_file(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a ``.safetensors`` file or a torch state dict (any other suffix).

    Torch files are read with ``weights_only=True``: a pickle that needs code is refused, never run.

    Raises:
        ConfigError: The file is missing, unreadable, or holds something other than named tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist")
    state = _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path)
    if not isinstance(state, Mapping) or not all(
        isinstance(key, str) and isinstance(value, Tensor) for key, value in state.items()
    ):
        raise ConfigError(f"weights file {path} holds a {type(state).__name__}, not a state dict of named tensors")
    return dict(state)


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises its own SafetensorError, among others
        raise ConfigError(f"weights file {path} is not a valid safetensors file: {one_line(err, 200)}") from err


def _read_torch(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for code-carrying pickles, others for junk
        raise ConfigError(
            f"weights file {path} is neither safetensors nor a torch state dict loadable with "
            f"weights_only=True (pickled code is never run): {one_line(err, 200)}"
        ) from err
