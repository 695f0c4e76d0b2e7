"""Checkpoints: the only module that talks to orbax.

Layout of one checkpoint directory `<workdir>/checkpoints/<step>/`, items saved separately:
  state/   step, params, opt_state, rng (orbax StandardSave; sharded arrays)
  ema/     {"ema_0": params, "ema_1": ...} in the order of config.train.ema_decays
  config/  the resolved config as JSON
  data/    the data position (JSON; the pipeline is a pure function of the step)
Sampling restores only `ema` + `config` (`restore_for_sampling`).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import ml_collections
import orbax.checkpoint as ocp

ITEMS = ("state", "ema", "config", "data")
SAMPLING_ITEMS = ("ema", "config")


def config_to_json(config) -> dict:
    return json.loads(config.to_json_best_effort())


def config_from_json(d: dict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(_lists_to_tuples(d))


def _lists_to_tuples(x):
    if isinstance(x, dict):
        return {k: _lists_to_tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_lists_to_tuples(v) for v in x)
    return x


class Checkpointer:
    """orbax CheckpointManager with async saves, keep-N and fall-back on a damaged latest checkpoint."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def save(self, step: int, main_state: dict, ema: dict, config, data_position: dict) -> bool:
        """Starts an (async) save of all four items at `step`; returns whether a save was started."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(main_state),
            ema=ocp.args.StandardSave(ema),
            config=ocp.args.JsonSave(config_to_json(config)),
            data=ocp.args.JsonSave(data_position))
        return self.manager.save(int(step), args=args, force=True)

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, abstract_main: dict, abstract_ema: dict, step: int | None = None):
        """Restores (step, main_state, ema, data_position) from `step` or the latest readable checkpoint.

        abstract_*: pytrees of jax.ShapeDtypeStruct with shardings (arrays are restored onto them).
        A checkpoint that fails to restore is reported and the previous one tried. Returns None if there is none.
        """
        steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
        for s in steps:
            try:
                out = self.manager.restore(s, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_main),
                    ema=ocp.args.StandardRestore(abstract_ema),
                    data=ocp.args.JsonRestore()))
                return s, out["state"], out["ema"], dict(out["data"])
            except Exception as e:  # noqa: BLE001 - any failure means this checkpoint is unusable
                logging.error("Checkpoint at step %d in %s is damaged or incomplete (%s: %s); trying the previous one.",
                              s, self.directory, type(e).__name__, e)
                if step is not None:
                    raise
        return None


class _DropReadOnlyNotice(logging.Filter):
    """orbax warns for every read-only manager (read only, hence no saves): that is what we asked for."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "Given directory is read only" not in msg and "read_only=True, setting save_interval_steps" not in msg


def _manager_for_reading(directory: str) -> ocp.CheckpointManager:
    absl_logger, notice = logging.getLogger("absl"), _DropReadOnlyNotice()
    absl_logger.addFilter(notice)
    try:
        options = ocp.CheckpointManagerOptions(read_only=True, create=False)
        return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=ITEMS)
    finally:
        absl_logger.removeFilter(notice)


def _resolve(path: str) -> tuple[str, int | None]:
    """Accepts a workdir, its checkpoints/ directory, or one step directory; returns (manager dir, step)."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return os.path.join(path, "checkpoints"), None
    base = os.path.basename(path.rstrip("/"))
    if base.isdigit() and os.path.isdir(os.path.join(path, "ema")):
        return os.path.dirname(path), int(base)
    return path, None


def restore_for_sampling(path: str, step: int | None = None) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """Loads only the config and the EMA parameters.

    path: a training workdir, its `checkpoints/` dir, or one step dir (`.../checkpoints/1000`).
    Returns (config, {str(decay): params}), e.g. {"0.9999": ..., "0.999": ...}; arrays land on the default device.
    """
    directory, step_in_path = _resolve(path)
    mngr = _manager_for_reading(directory)
    steps = [step if step is not None else step_in_path] if (step is not None or step_in_path is not None) \
        else sorted(mngr.all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(f"No checkpoint found under {directory}.")
    last_err = None
    for s in steps:
        try:
            cfg = mngr.restore(s, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
            ema = mngr.restore(s, args=ocp.args.Composite(ema=ocp.args.StandardRestore()))["ema"]
            config = config_from_json(cfg)
            decays = [str(float(d)) for d in config.train.ema_decays]
            if len(decays) != len(ema):
                raise ValueError(f"checkpoint has {len(ema)} EMA trees but its config lists {len(decays)} decays.")
            return config, {d: ema[f"ema_{i}"] for i, d in enumerate(decays)}
        except Exception as e:  # noqa: BLE001
            logging.error("Cannot read checkpoint step %d in %s (%s); trying the previous one.", s, directory, e)
            last_err = e
    raise FileNotFoundError(f"No readable checkpoint under {directory}: {last_err}")


def save_for_sampling(directory: str, params, config, *, step: int = 0) -> str:
    """Writes a sampling-only checkpoint (ema + config; used by the weight converter).

    `params` is stored as the EMA for every decay listed in config.train.ema_decays (a converted official
    checkpoint *is* the EMA). Returns the step directory. Readable by `restore_for_sampling(directory)`.
    """
    directory = os.path.abspath(directory)
    decays = tuple(config.train.ema_decays) if "train" in config and "ema_decays" in config.train else (0.9999,)
    if "train" not in config or "ema_decays" not in config.train:
        config = ml_collections.ConfigDict(config.to_dict())
        config.setdefault("train", ml_collections.ConfigDict())
        config.train.ema_decays = decays
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
    mngr = ocp.CheckpointManager(directory, options=options, item_names=ITEMS)
    ema = {f"ema_{i}": params for i in range(len(decays))}
    mngr.save(int(step), args=ocp.args.Composite(
        ema=ocp.args.StandardSave(ema), config=ocp.args.JsonSave(config_to_json(config))), force=True)
    mngr.wait_until_finished()
    mngr.close()
    return os.path.join(directory, str(int(step)))


# -- tuned conditioning vectors (imm_jax.inference.tuning), stored beside a checkpoint --------------------------
# <step_dir>/tuned/<name>/  orbax composite: vectors/ (StandardSave, a dict of (N, L, D) float32), meta/ (JSON).

TUNED_DIR = "tuned"


def sampling_step_dir(path: str, step: int | None = None) -> str:
    """The step directory `restore_for_sampling(path, step)` reads first (the latest step by default)."""
    directory, step_in_path = _resolve(path)
    s = step if step is not None else step_in_path
    if s is None:
        steps = sorted(_manager_for_reading(directory).all_steps())
        if not steps:
            raise FileNotFoundError(f"No checkpoint found under {directory}.")
        s = steps[-1]
    step_dir = os.path.join(directory, str(int(s)))
    if not os.path.isdir(step_dir):
        raise FileNotFoundError(f"No checkpoint step directory {step_dir}.")
    return step_dir


def save_tuned(step_dir: str, name: str, vectors: dict, meta: dict) -> str:
    """Writes tuned vectors (a dict of arrays) and JSON metadata as `<step_dir>/tuned/<name>`; returns the path.

    An existing set of the same name is replaced.
    """
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"tuned-vector set name must be a plain directory name, got {name!r}")
    path = os.path.join(os.path.abspath(step_dir), TUNED_DIR, name)
    ckpt = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    ckpt.save(path, args=ocp.args.Composite(vectors=ocp.args.StandardSave(dict(vectors)),
                                            meta=ocp.args.JsonSave(meta)), force=True)
    ckpt.close()
    return path


def load_tuned(path: str) -> tuple[dict, dict]:
    """Reads a set written by `save_tuned`: (dict of arrays, meta dict)."""
    path = os.path.abspath(path)
    if not os.path.isdir(os.path.join(path, "meta")):
        raise FileNotFoundError(f"{path} is not a tuned-vector set (no meta/ item); sets live in "
                                f"<checkpoint step>/{TUNED_DIR}/<name>.")
    ckpt = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    out = ckpt.restore(path, args=ocp.args.Composite(vectors=ocp.args.StandardRestore(),
                                                     meta=ocp.args.JsonRestore()))
    ckpt.close()
    return dict(out["vectors"]), dict(out["meta"])


def list_tuned(step_dir: str) -> list[str]:
    """Paths of the tuned-vector sets stored beside the checkpoint in `step_dir` (sorted by name)."""
    root = os.path.join(os.path.abspath(step_dir), TUNED_DIR)
    if not os.path.isdir(root):
        return []
    return [os.path.join(root, n) for n in sorted(os.listdir(root))
            if os.path.isdir(os.path.join(root, n, "meta"))]
