"""Parameter sharding rules for a ("data", "fsdp") mesh.

Small tensors (biases, norms, embedders) are replicated; large ones are split over the "fsdp" axis along
their largest dimension that the fsdp size divides (ties go to the later axis, usually the output
features). Tensors with no divisible dimension stay replicated. The rules look only at shapes, so they
apply to real params, `jax.eval_shape` results and optimizer states of the same structure alike.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec

FSDP_AXIS = "fsdp"


def leaf_partition_spec(shape: tuple[int, ...], *, fsdp_size: int, min_size: int = 2 ** 18) -> PartitionSpec:
    """PartitionSpec for one tensor of `shape` (see module docstring)."""
    if fsdp_size < 1:
        raise ValueError(f"fsdp_size must be >= 1, got {fsdp_size}")
    if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    candidates = [(dim, axis) for axis, dim in enumerate(shape) if dim % fsdp_size == 0]
    if not candidates:
        return PartitionSpec()
    _, axis = max(candidates)
    return PartitionSpec(*([None] * axis + [FSDP_AXIS]))


def param_partition_specs(params_or_shapes: Any, *, fsdp_size: int, min_size: int = 2 ** 18) -> Any:
    """Pytree of PartitionSpec matching `params_or_shapes` (arrays or ShapeDtypeStructs).

    Args:
      params_or_shapes: the param tree (or any tree whose leaves have `.shape`).
      fsdp_size: size of the mesh's "fsdp" axis.
      min_size: tensors with fewer elements are replicated.
    """
    return jax.tree.map(lambda leaf: leaf_partition_spec(tuple(leaf.shape), fsdp_size=fsdp_size,
                                                         min_size=min_size), params_or_shapes)
