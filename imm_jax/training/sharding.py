"""Device mesh and shardings: one mesh with axes ("data", "fsdp").

The batch is split over both axes (every device holds different examples: FSDP is data parallel too);
parameters, optimizer state and EMA follow the networks' partition rules over "fsdp" (replicated over
"data"), or are replicated when the networks package provides no rules.
"""
from __future__ import annotations

import logging

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int]:
    """(data, fsdp) sizes from config.mesh; -1 in one of them means 'all remaining devices'."""
    data, fsdp = int(mesh_config.data), int(mesh_config.fsdp)
    if data == -1 and fsdp == -1:
        raise ValueError("config.mesh.data and config.mesh.fsdp cannot both be -1; set one of them (e.g. --config.mesh.fsdp=1).")
    if data == -1:
        if num_devices % fsdp:
            raise ValueError(f"config.mesh.fsdp={fsdp} does not divide the {num_devices} devices; choose a divisor.")
        data = num_devices // fsdp
    if fsdp == -1:
        if num_devices % data:
            raise ValueError(f"config.mesh.data={data} does not divide the {num_devices} devices; choose a divisor.")
        fsdp = num_devices // data
    if data * fsdp != num_devices:
        raise ValueError(f"config.mesh data*fsdp = {data}*{fsdp} = {data * fsdp} but there are {num_devices} devices; "
                         "set config.mesh.data=-1 to use all devices.")
    return data, fsdp


def make_mesh(mesh_config, devices=None) -> Mesh:
    """Mesh of all (global) devices, shaped (data, fsdp) in device order so each host's devices are contiguous."""
    devices = jax.devices() if devices is None else devices
    data, fsdp = mesh_shape(mesh_config, len(devices))
    return Mesh(np.asarray(devices).reshape(data, fsdp), ("data", "fsdp"))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over data and fsdp; other axes whole."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _partition_rules():
    try:
        from imm_jax.networks.partitioning import param_partition_specs  # type: ignore
        return param_partition_specs
    except ImportError:
        return None


def state_shardings(abstract_state, mesh: Mesh, min_size: int | None = None):
    """NamedShardings for a pytree of ShapeDtypeStructs (params, opt_state, EMA alike).

    Uses `imm_jax.networks.partitioning.param_partition_specs` (shape-based rules over "fsdp") when available.
    The rule is shape based, so optimizer moments and EMA copies get the same layout as their parameter.
    min_size: tensors with fewer elements stay replicated (config.mesh.fsdp_min_size; networks' default 2**18).
    """
    rules = _partition_rules()
    fsdp = mesh.shape["fsdp"]
    if rules is None or fsdp == 1:
        if rules is None and fsdp > 1:
            logging.warning("imm_jax.networks.partitioning is not available: replicating parameters (no FSDP).")
        return jax.tree.map(lambda _: replicated(mesh), abstract_state)
    kw = {} if min_size is None else {"min_size": int(min_size)}
    specs = rules(abstract_state, fsdp_size=fsdp, **kw)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                        is_leaf=lambda x: isinstance(x, P))


def process_batch_rows(sharding: NamedSharding, global_batch: int) -> tuple[int, int]:
    """[start, stop) rows of the global batch whose data this process must provide."""
    idx = sharding.addressable_devices_indices_map((global_batch,))
    starts = [s[0].start or 0 for s in idx.values()]
    stops = [global_batch if s[0].stop is None else s[0].stop for s in idx.values()]
    start, stop = min(starts), max(stops)
    covered = sum(b - a for a, b in {(a, b) for a, b in zip(starts, stops)})
    if covered != stop - start:
        raise ValueError("This process's devices do not hold a contiguous slice of the batch; "
                         "build the mesh from jax.devices() in order (imm_jax.training.sharding.make_mesh).")
    return start, stop
