"""Public sampling API: `imm_jax.load(checkpoint)` -> Sampler, and `imm_jax.sample(checkpoint, n, ...)`.

A checkpoint is a training workdir, its `checkpoints/` directory, one step directory, or the output of
`python -m imm_jax.convert`; only the EMA parameters and the config are restored.

    import imm_jax
    images = imm_jax.sample("runs/fmnist", 64, steps=2, cfg_scale=2.0)      # (64, 28, 28, 1) uint8
    sampler = imm_jax.load("runs/fmnist")                                    # compile once, reuse
    grid1 = sampler(16, steps=1, labels=[0] * 16)
    grid8 = sampler(16, preset="imagenet-8step", ...)                       # presets mirror the paper
    tuned = imm_jax.load("runs/fmnist", tuned=True)       # + time embeddings tuned by imm_jax.inference.tuning
    imgs = tuned(16, steps=2, labels=[0] * 16)            # error unless a set matches sampler/steps/grid

Sampling runs data-parallel over all local devices (a 1-D mesh; params replicated); the batch is padded
to a multiple of the device count. One compilation per (steps, batch, sampler, guided) is kept and reused.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from imm_jax import networks
from imm_jax.core import sampling
from imm_jax.core.losses import IMMObjective, objective_name
from imm_jax.inference import tuned_vectors
from imm_jax.io import images

# The paper's sampler settings (spec §5, §7): CIFAR-10 unconditional, ImageNet-256 uniform grids, CFG 1.5.
PRESETS = {
    "cifar10-1step": dict(steps=1, grid="uniform", cfg_scale=None),
    "cifar10-2step": dict(steps=2, grid="etas", mid_etas=(1.4,), cfg_scale=None),
    **{f"imagenet-{n}step": dict(steps=n, grid="uniform", cfg_scale=1.5) for n in (1, 2, 4, 8)},
}


def _pick_ema(emas: dict, ema: Optional[float], config) -> tuple[str, Any]:
    if ema is not None:
        key = str(float(ema))
        if key not in emas:
            raise ValueError(f"EMA decay {ema} not in this checkpoint; it has {sorted(emas)}.")
        return key, emas[key]
    wanted = config.train.get("sample_ema", None) if "train" in config else None
    if wanted is not None and str(float(wanted)) in emas:
        return str(float(wanted)), emas[str(float(wanted))]
    # As the training loop's sample grids: the fastest EMA, which is meaningful early in a run (a slow EMA
    # without warm-up still carries the initial weights after a short run). Configs meant for long runs set
    # train.sample_ema (cifar10 / imagenet256: 0.9999, the paper's evaluation EMA).
    key = min(emas, key=float)
    return key, emas[key]


class Sampler:
    """A restored model that turns noise into uint8 images; compiled once per (steps, batch) and reused.

    Attributes:
      config: the model's resolved ConfigDict.
      ema: the EMA decay whose params are used (a string such as "0.9999").
      num_compiles: how many sampling programs have been traced so far.
    """

    def __init__(self, config, params=None, *, ema: str = "", vae_path: Optional[str] = None, devices=None,
                 tuned=None, backend: Optional[str] = None, mesh: Optional[Mesh] = None):
        """params: EMA params, or None to pass `params=` to each call (the training loop's grids and FID).

        mesh: sample over this mesh (the trainer's) with params used where they are placed, the batch
        padded to the "data" axis and the output replicated; default: a 1-D mesh of `devices` (all local
        devices) with params replicated.
        """
        self.config = config
        self.ema = ema
        self.devices = list(mesh.devices.flat) if mesh is not None else list(devices or jax.local_devices())
        # the layers' execution path: the devices' own unless given (an export for another platform)
        self.net = networks.build(config.model, backend=backend, devices=self.devices)
        self.objective = IMMObjective.from_config(config.imm, num_classes=config.model.num_classes)
        self.num_classes = int(config.model.num_classes)
        own_mesh = mesh is None
        mesh = Mesh(np.asarray(self.devices), ("data",)) if own_mesh else mesh
        self._replicated = NamedSharding(mesh, P())
        if own_mesh:
            self._params_sharding, self._batch_sharding = self._replicated, NamedSharding(mesh, P("data"))
        else:  # a global mesh: numpy inputs must be replicated; the output is replicated for every host
            self._params_sharding, self._batch_sharding = None, self._replicated
        self._batch_multiple = int(mesh.shape["data"])
        self.params = None if params is None else jax.device_put(params, self._params_sharding or self._replicated)
        self.shape = (int(config.model.image_size),) * 2 + (int(config.model.in_channels),)
        self._programs = {}
        self.num_compiles = 0
        self._vae = None
        self._vae_path = vae_path
        # Tuned time embeddings (imm_jax.inference.tuned_vectors.TunedVectors), used for the matching sampler and grid.
        self.tuned = list(tuned or [])

    @classmethod
    def from_checkpoint(cls, checkpoint: str, *, ema: Optional[float] = None, step: Optional[int] = None,
                        vae_path: Optional[str] = None, tuned=None) -> "Sampler":
        from imm_jax.training import checkpointing
        config, emas = checkpointing.restore_for_sampling(checkpoint, step=step)
        key, params = _pick_ema(emas, ema, config)
        return cls(config, params, ema=key, vae_path=vae_path, tuned=_load_tuned(tuned, checkpoint, step))

    # -- the compiled core -----------------------------------------------------------------------------

    def _program(self, steps: int, batch: int, sampler: str, guided: bool, tuned: bool = False):
        key = (steps, batch, sampler, guided) + ((True,) if tuned else ())
        if key not in self._programs:
            net, obj, shape = self.net, self.objective, (batch,) + self.shape

            def run(params, rng, labels, grid, cfg_scale, offsets=None):
                self.num_compiles += 1  # runs at trace time only
                return sampling.generate(net, params, rng, shape, objective=obj, grid=grid, labels=labels,
                                         cfg_scale=cfg_scale if guided else None, sampler=sampler,
                                         cond_offset=offsets)

            rep, bat = self._replicated, self._batch_sharding
            labels_sharding = None if self.num_classes == 0 else bat
            shardings = (self._params_sharding, rep, labels_sharding, rep, rep) + ((rep,) if tuned else ())
            self._programs[key] = jax.jit(run, in_shardings=shardings, out_shardings=bat)
        return self._programs[key]

    def tuned_for(self, steps: int, grid: str = "uniform", mid_etas: Optional[Sequence[float]] = None,
                  sampler: Optional[str] = None):
        """The loaded TunedVectors for this sampler and grid; ValueError if none matches."""
        sampler = self.check_sampler(sampler)
        if not self.tuned:
            raise ValueError("no tuned time embeddings are loaded: use imm_jax.load(checkpoint, tuned=True) "
                             "(sets saved beside the checkpoint by python -m imm_jax.tuning).")
        return tuned_vectors.select(self.tuned, sampler, self.time_grid(steps, grid, mid_etas))

    def check_sampler(self, sampler: Optional[str]) -> str:
        """`sampler`, or the config's sample.sampler when None; ValueError if it does not fit the objective."""
        objective = objective_name(self.config)
        if sampler is None:
            sampler = self.config.get("sample", {}).get("sampler", None) or sampling.default_sampler(objective)
        if (objective == "fm") != (sampler in sampling.FM_SAMPLERS):
            raise ValueError(f"sampler={sampler!r} does not fit this {objective.upper()} model: use "
                             + ("'euler' or 'heun' (flow matching)" if objective == "fm"
                                else "'pushforward' or 'restart' (IMM)") + ".")
        return sampler

    def time_grid(self, steps: int, grid: str = "uniform", mid_etas: Optional[Sequence[float]] = None):
        o = self.objective
        return sampling.time_grid(grid, steps, schedule=o.param.schedule, t_min=o.t_min, t_max=o.t_max,
                                  mid_etas=mid_etas)

    def generate(self, rng, labels=None, *, steps: int = 1, grid: str = "uniform",
                 mid_etas: Optional[Sequence[float]] = None, sampler: Optional[str] = None,
                 cfg_scale: Optional[float] = None, batch_size: Optional[int] = None,
                 tuned: Optional[bool] = None, params=None):
        """One batch in model space: float32 (B, H, W, C). B = len(labels) or batch_size.

        tuned: None uses the loaded tuned time embeddings if any were loaded (then one must match the
        sampler, steps and grid, else ValueError), True requires them, False samples without them.
        params: EMA params to use instead of the loaded ones.
        """
        params = self.params if params is None else params
        if params is None:
            raise ValueError("this Sampler holds no params: pass params=...")
        sampler = self.check_sampler(sampler)
        if self.num_classes == 0 and labels is not None:
            raise ValueError("this model is unconditional (num_classes = 0): pass labels=None.")
        if self.num_classes and labels is None:
            raise ValueError("this model is class-conditional: pass labels (ints in [0, num_classes]).")
        batch = len(labels) if labels is not None else int(batch_size or 0)
        if batch < 1:
            raise ValueError("empty batch: pass labels or batch_size >= 1.")
        padded = math.ceil(batch / self._batch_multiple) * self._batch_multiple
        if labels is not None:
            labels = np.asarray(labels, np.int32)
            if labels.min() < 0 or labels.max() > self.num_classes:
                raise ValueError(f"labels must lie in [0, {self.num_classes}] ({self.num_classes} = null class).")
            labels = np.concatenate([labels, np.full(padded - batch, self.num_classes, np.int32)])
        guided = cfg_scale is not None and self.num_classes > 0 and float(cfg_scale) != 1.0
        use_tuned = bool(self.tuned) if tuned is None else bool(tuned)
        extra = (self.tuned_for(steps, grid, mid_etas, sampler).offsets,) if use_tuned else ()
        program = self._program(steps, padded, sampler, guided, use_tuned)
        t_grid = np.asarray(self.time_grid(steps, grid, mid_etas), np.float32)
        out = program(params, rng, labels, t_grid, np.float32(cfg_scale if guided else 1.0), *extra)
        return out[:batch]

    # -- decoding ---------------------------------------------------------------------------------------

    def decode(self, x) -> np.ndarray:
        """Model-space samples -> uint8 (N, H, W, C); latent models decode through the SD-VAE."""
        x = np.asarray(x)  # (a replicated global array in multi-process sampling)
        if self.is_latent:
            return self._decode_latents(x)
        return images.to_uint8(x, int(self.config.data.get("pad", 0) or 0))

    @property
    def is_latent(self) -> bool:
        return self.config.data.get("source", "") == "latents"

    def vae_dir(self) -> str:
        """The local SD-VAE directory a latent model decodes with (checked); ValueError/FileNotFoundError if none."""
        from imm_jax.networks import vae
        path = self._vae_path or self.config.get("vae", {}).get("path", "")
        if not path:
            raise ValueError("this is a latent model: pass vae_path=<local diffusers directory of "
                             "stabilityai/sd-vae-ft-ema> to imm_jax.load / imm_jax.sample (--vae_path on the "
                             "command line) to decode its samples.")
        return vae.check_local_dir(path)

    def _decode_latents(self, x) -> np.ndarray:
        from imm_jax.networks import vae
        if self._vae is None:
            module, params = vae.load_pretrained(self.vae_dir(),
                                                 dtype=self.config.get("vae", {}).get("dtype", "float16"))
            self._vae = (module, params, jax.jit(lambda p, z: vae.decode_to_uint8(module, p, z)))
        _, params, fn = self._vae
        return np.concatenate([np.asarray(fn(params, x[i:i + 8])) for i in range(0, len(x), 8)])

    # -- the user-facing call ------------------------------------------------------------------------------

    def __call__(self, num_samples: int, *, preset: Optional[str] = None, steps: Optional[int] = None,
                 sampler: Optional[str] = None, grid: Optional[str] = None,
                 mid_etas: Optional[Sequence[float]] = None, cfg_scale: Optional[float] = None,
                 labels=None, seed: int = 0, batch_size: Optional[int] = None, start: int = 0,
                 progress: bool = False, return_labels: bool = False, tuned: Optional[bool] = None,
                 params=None):
        """num_samples uint8 images (N, H, W, C); see `sample` for the arguments.

        start: index of the first sample (resuming a long run in chunks gives identical samples).
        return_labels: also return the (N,) int32 class labels used (-1 for unconditional models).
        tuned: use the loaded tuned time embeddings (None: if any are loaded; see `generate`).
        params: EMA params to use instead of the loaded ones (the training loop passes its current EMA).
        """
        if self.is_latent:
            self.vae_dir()  # before any sampling: a missing or wrong VAE path fails now, not after the last batch
        opts = resolve_options(self.config, preset=preset, steps=steps, grid=grid, mid_etas=mid_etas,
                               cfg_scale=cfg_scale)
        if self.num_classes == 0:
            opts["cfg_scale"] = None
        if labels is not None:
            labels = np.broadcast_to(np.asarray(labels, np.int32), (num_samples,))
        bs = int(batch_size or min(num_samples, 256))
        base = jax.random.key(seed)
        label_base = jax.random.fold_in(base, 2**31 - 1)
        out, used, t0 = [], [], time.time()
        # Batches are numbered from sample 0, so sample i depends only on (seed, i, batch size) and a run
        # resumed at `start` reproduces the samples an uninterrupted run would have made.
        for first in range(start - start % bs, start + num_samples, bs):
            idx = np.arange(first, first + bs)
            keep = (idx >= start) & (idx < start + num_samples)
            lab = None
            if self.num_classes:
                lab = np.array(jax.random.randint(jax.random.fold_in(label_base, first // bs), (bs,), 0,
                                                    self.num_classes), np.int32)
                if labels is not None:
                    lab[keep] = labels[idx[keep] - start]
            x = self.generate(jax.random.fold_in(base, first // bs), lab, batch_size=bs, sampler=sampler,
                              tuned=tuned, params=params, **opts)
            out.append(self.decode(x)[keep])
            used.append(lab[keep] if lab is not None else np.full(int(keep.sum()), -1, np.int32))
            if progress:
                done = min(first + bs, start + num_samples) - start
                rate = done / max(time.time() - t0, 1e-9)
                print(f"\rsampling {done}/{num_samples} ({rate:.1f} img/s)", end="", file=sys.stderr, flush=True)
        if progress:
            print(file=sys.stderr)
        imgs = np.concatenate(out)[:num_samples]
        return (imgs, np.concatenate(used)[:num_samples]) if return_labels else imgs


def resolve_options(config, *, preset=None, steps=None, grid=None, mid_etas=None, cfg_scale=None) -> dict:
    """Merge a preset, explicit arguments and the config's `sample` defaults (explicit wins)."""
    opts = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"Unknown preset {preset!r}; choose from {sorted(PRESETS)}.")
        opts.update(PRESETS[preset])
    sample_cfg = config.get("sample", {})
    defaults = dict(steps=1, grid=sample_cfg.get("grid", "uniform"), mid_etas=None,
                    cfg_scale=sample_cfg.get("cfg_scale", None))
    given = dict(steps=steps, grid=grid, mid_etas=mid_etas, cfg_scale=cfg_scale)
    for k, v in defaults.items():
        if given[k] is not None:
            opts[k] = given[k]
        opts.setdefault(k, v)
    if opts["grid"] != "etas":
        opts["mid_etas"] = None
    elif opts["mid_etas"] is None:  # config.sample.mid_etas.s<N> = (eta_1, ..., eta_{N-1})
        table = sample_cfg.get("mid_etas", None) or {}
        found = dict(table).get(f"s{opts['steps']}", None)
        opts["mid_etas"] = None if found is None else tuple(float(e) for e in found)
    return opts


def _load_tuned(tuned, checkpoint: str, step: Optional[int]) -> list:
    """tuned=None/False -> []; True -> every set saved beside the checkpoint; a path, a TunedVectors or a
    list of them -> those."""
    if tuned is None or tuned is False:
        return []
    if tuned is True:
        found = tuned_vectors.load_all(checkpoint, step)
        if not found:
            raise FileNotFoundError(f"tuned=True but no tuned time embeddings are stored beside {checkpoint}; "
                                    "make them with python -m imm_jax.tuning --checkpoint=...")
        return found
    items = tuned if isinstance(tuned, (list, tuple)) else [tuned]
    return [tuned_vectors.load(t) if isinstance(t, str) else t for t in items]


def load(checkpoint: str, *, ema: Optional[float] = None, step: Optional[int] = None,
         vae_path: Optional[str] = None, tuned=None) -> Sampler:
    """Restore EMA params + config from `checkpoint` into a reusable `Sampler`.

    tuned: True loads every set of tuned time embeddings saved beside the checkpoint (`imm_jax.inference.tuning`);
    a set's directory, a `TunedVectors` or a list of them also work. Sampling then uses the set made for
    the requested sampler/steps/grid and raises ValueError when none matches (pass tuned=False to the
    call to sample without them).
    """
    return Sampler.from_checkpoint(checkpoint, ema=ema, step=step, vae_path=vae_path, tuned=tuned)


def sample(checkpoint: str, num_samples: int, *, steps: Optional[int] = None, sampler: Optional[str] = None,
           grid: Optional[str] = None, mid_etas: Optional[Sequence[float]] = None,
           cfg_scale: Optional[float] = None, labels=None, seed: int = 0, batch_size: Optional[int] = None,
           preset: Optional[str] = None, ema: Optional[float] = None, vae_path: Optional[str] = None,
           progress: bool = False, tuned=None) -> np.ndarray:
    """Generate `num_samples` uint8 images (N, H, W, C) from a checkpoint.

    Args:
      checkpoint: workdir, checkpoints dir, step dir, or converted official weights.
      steps: sampling steps (1, 2, 4, 8, ...). Defaults: the preset's, else 1.
      sampler: "pushforward" (best in the paper) or "restart" for IMM models; "euler" or "heun" for the
        flow-matching baseline. Default: the config's sample.sampler.
      grid: "uniform" | "edm" | "etas" (with mid_etas, e.g. CIFAR-10 2-step mid_etas=(1.4,)).
      cfg_scale: guidance weight w (class-conditional models; default from the config's sample.cfg_scale).
      labels: class ids, one or num_samples of them; None draws them uniformly (seeded).
      seed: sample i depends only on (seed, i, batch_size).
      preset: a name from PRESETS, e.g. "cifar10-2step" or "imagenet-8step"; explicit arguments override it.
      ema: which EMA decay to use (default: config.train.sample_ema, else the fastest, as the training grids).
      vae_path: local SD-VAE directory for latent models.
      tuned: tuned time embeddings (see `load`); True picks the set saved beside the checkpoint for this
        sampler/steps/grid (ValueError if there is none for it).
    """
    s = load(checkpoint, ema=ema, vae_path=vae_path, tuned=tuned)
    return s(num_samples, preset=preset, steps=steps, sampler=sampler, grid=grid, mid_etas=mid_etas,
             cfg_scale=cfg_scale, labels=labels, seed=seed, batch_size=batch_size, progress=progress)
