"""Start-up validation of a training config. Every error says what is wrong and what to change."""
from __future__ import annotations

import os

from imm_jax.errors import UserError
from imm_jax.training.input_pipeline import SOURCES
from imm_jax.training.optim import OPTIMIZERS

REQUIRED = {
    "": ("seed", "model", "imm", "data", "optim", "train", "mesh", "sample"),
    "model": ("name", "num_classes", "image_size", "in_channels", "dtype"),
    "imm": ("schedule", "f_type", "sigma_d", "temb", "time_scale", "t_min", "t_max", "particles", "k",
            "min_gap", "mapping", "a", "b", "kernel", "label_dropout"),
    "data": ("source", "batch_size"),
    "optim": ("name", "lr", "b1", "b2", "eps", "weight_decay", "warmup_steps", "grad_clip"),
    "train": ("num_steps", "log_every", "ckpt_every", "keep_checkpoints", "sample_every", "ema_decays"),
    "mesh": ("data", "fsdp"),
    "sample": ("steps", "cfg_scale"),
}
KNOWN_TOP = set(REQUIRED[""]) | {"vae", "eval"}  # optional: vae (latent models' decoder), eval (FID in training)
EVAL_FIELDS = ("every", "num_samples", "steps", "batch_size", "ref_split", "ref_images", "ref_stats", "weights", "seed")


class ConfigError(UserError):
    """A config value that cannot work; the message names the field and the fix."""


def _augment_errors(config) -> list[str]:
    """EDM augmentation (config.data.augment_p / augment_ops) against the network's augment embedding."""
    from imm_jax.training import augment
    d, m = config.data, config.model
    try:
        pipe = augment.AugmentPipe.from_config(d)
    except ValueError as e:
        return [str(e)]
    dim = int(m.get("augment_dim", 0) or 0)
    out = []
    if not 0.0 <= pipe.p <= 1.0:
        return [f"config.data.augment_p={pipe.p} must be in [0, 1] (EDM's CIFAR-10 value is 0.12; 0 turns it off)."]
    if dim and m.name != "unet":
        out.append(f"config.model.augment_dim={dim}: only the DDPM++ UNet has an augmentation embedding "
                   "(map_augment); set augment_dim = 0 and augment_p = 0 for a DiT.")
    elif pipe.active and dim == 0:
        out.append(f"config.data.augment_p={pipe.p} augments images but config.model.augment_dim = 0, so the network "
                   "cannot tell augmented images from real ones and the augmentations leak into the samples; set "
                   f"--config.model.augment_dim={pipe.label_dim} (the label width of the enabled operations).")
    elif pipe.active and dim != pipe.label_dim:
        out.append(f"config.model.augment_dim={dim} but the enabled augmentations {list(pipe.ops)} give labels of "
                   f"width {pipe.label_dim}; set --config.model.augment_dim={pipe.label_dim}.")
    elif dim and not pipe.active:
        out.append(f"config.model.augment_dim={dim} but augmentation is off (config.data.augment_p = 0): the "
                   "augment embedding would only ever see zero labels; set augment_p > 0 (EDM: 0.12) or "
                   "augment_dim = 0.")
    if pipe.active and d.source == "latents":
        out.append("config.data.augment_p > 0 with config.data.source='latents': the augmentations are geometric "
                   "transforms of images, not of VAE latents; set augment_p = 0.")
    return out


def validate(config, *, num_devices: int, num_processes: int = 1) -> None:
    """Checks `config` for a run on `num_devices` global devices; raises ConfigError listing every problem."""
    errors: list[str] = []
    for top in config.keys():
        if top not in KNOWN_TOP:
            errors.append(f"unknown top-level config field {top!r}; known: {sorted(KNOWN_TOP)}.")
    for section, names in REQUIRED.items():
        node = config if not section else config.get(section, None)
        if node is None:
            errors.append(f"config.{section} is missing.")
            continue
        for n in names:
            if n not in node:
                errors.append(f"config.{section + '.' if section else ''}{n} is missing.")
    if errors:
        raise ConfigError("Invalid config:\n  - " + "\n  - ".join(errors))

    m, imm, d, o, t = config.model, config.imm, config.data, config.optim, config.train
    if m.name not in ("unet", "dit"):
        errors.append(f"config.model.name={m.name!r}: use 'unet' or 'dit'.")
    if m.dtype not in ("float32", "bfloat16", "float16"):
        errors.append(f"config.model.dtype={m.dtype!r}: use float32, bfloat16 or float16.")
    if imm.schedule not in ("fm", "cosine"):
        errors.append(f"config.imm.schedule={imm.schedule!r}: use 'fm' (OT-FM) or 'cosine'.")
    if imm.f_type not in ("identity", "simple_edm", "euler_fm"):
        errors.append(f"config.imm.f_type={imm.f_type!r}: use identity, simple_edm or euler_fm.")
    if imm.f_type == "euler_fm" and imm.schedule != "fm":
        errors.append("config.imm.f_type='euler_fm' requires config.imm.schedule='fm' (Euler-FM is defined for "
                      "OT-FM only); set --config.imm.schedule=fm or use f_type=simple_edm.")
    if imm.temb not in ("s", "stride"):
        errors.append(f"config.imm.temb={imm.temb!r}: use 's' (second input s) or 'stride' (t - s).")
    if imm.kernel not in ("laplace", "rbf"):
        errors.append(f"config.imm.kernel={imm.kernel!r}: use 'laplace' or 'rbf'.")
    if not (0.0 <= imm.t_min < imm.t_max <= 1.0):
        errors.append(f"config.imm needs 0 <= t_min < t_max <= 1 (got t_min={imm.t_min}, t_max={imm.t_max}).")
    if imm.schedule == "cosine" and imm.t_max >= 1.0:
        errors.append("config.imm.t_max must be < 1 for the cosine schedule (eta is infinite at t=1); the paper uses 0.996.")
    k_end = imm.get("k_end", None)
    if k_end is not None and (int(k_end) < int(imm.k) or int(imm.get("k_ramp_steps", 0) or 0) < 1):
        errors.append(f"config.imm.k_end={k_end} schedules k from config.imm.k={imm.k} up to k_end over "
                      "config.imm.k_ramp_steps steps: it needs k_end >= k and k_ramp_steps >= 1 (got "
                      f"{imm.get('k_ramp_steps', 0)}); leave k_end unset for a constant k.")
    if not (0.0 <= imm.label_dropout < 1.0):
        errors.append(f"config.imm.label_dropout={imm.label_dropout} must be in [0, 1).")
    if imm.label_dropout > 0 and m.num_classes == 0:
        errors.append("config.imm.label_dropout > 0 needs a class-conditional model (config.model.num_classes > 0).")
    if config.sample.cfg_scale not in (None,) and float(config.sample.cfg_scale) != 1.0 and m.num_classes == 0:
        errors.append("config.sample.cfg_scale != 1 needs a class-conditional model; set --config.sample.cfg_scale=1.")
    if m.dtype != "float32" and imm.min_gap <= 0:
        errors.append(f"config.model.dtype={m.dtype} trains t and r that low precision cannot tell apart; set "
                      "--config.imm.min_gap=1e-4 (and preferably temb='stride', a=2) as in the paper (spec §10).")

    objective = imm.get("objective", "imm")
    sampler = config.sample.get("sampler", "pushforward")
    if objective not in ("imm", "fm"):
        errors.append(f"config.imm.objective={objective!r}: use 'imm' or 'fm' (the flow-matching baseline).")
    elif objective == "fm" and sampler not in ("euler", "heun"):
        errors.append(f"config.imm.objective='fm' trains a velocity; config.sample.sampler={sampler!r} needs an "
                      "IMM model. Set --config.sample.sampler=euler (or heun).")
    elif objective == "imm" and sampler in ("euler", "heun"):
        errors.append(f"config.sample.sampler={sampler!r} integrates a flow-matching velocity, but "
                      "config.imm.objective='imm'; use pushforward or restart (or train with objective=fm).")

    M = int(imm.particles) if objective == "imm" else 1
    B = int(d.batch_size)
    if M < 1:
        errors.append(f"config.imm.particles={M} must be >= 1 (the paper uses 4).")
    if B < 1:
        errors.append(f"config.data.batch_size={B} must be >= 1.")
    if M >= 1 and B % M:
        errors.append(f"config.data.batch_size={B} is not divisible by config.imm.particles={M}; use a multiple "
                      f"of {M}, e.g. {max(M, B - B % M)}.")
    if num_devices and B % num_devices:
        errors.append(f"config.data.batch_size={B} is not divisible by the {num_devices} data-parallel devices; "
                      f"use a multiple of {num_devices}.")
    elif num_devices and M >= 1 and (B // num_devices) % M:
        errors.append(f"each device would hold {B // num_devices} examples, not a whole number of particle groups "
                      f"of M={M} (groups must not straddle devices); make batch_size a multiple of "
                      f"{M * num_devices} (= particles * devices).")
    if num_processes > 1 and B % num_processes:
        errors.append(f"config.data.batch_size={B} is not divisible by the {num_processes} processes.")
    if d.source not in SOURCES:
        errors.append(f"config.data.source={d.source!r}: use one of {SOURCES}.")
    if d.source == "tfds" and not d.get("name", None):
        errors.append("config.data.source='tfds' needs config.data.name (e.g. 'cifar10').")
    errors.extend(_augment_errors(config))
    if o.name not in OPTIMIZERS:
        errors.append(f"config.optim.name={o.name!r}: use one of {OPTIMIZERS}.")
    if o.lr <= 0:
        errors.append(f"config.optim.lr={o.lr} must be > 0.")
    decays = tuple(t.ema_decays)
    if not decays:
        errors.append("config.train.ema_decays is empty; give at least one decay, e.g. (0.9999,).")
    for dcy in decays:
        if not (0.0 <= float(dcy) < 1.0):
            errors.append(f"config.train.ema_decays contains {dcy}; decays must be in [0, 1).")
    if len(set(decays)) != len(decays):
        errors.append(f"config.train.ema_decays={decays} has duplicates.")
    for n in ("num_steps", "log_every", "ckpt_every", "keep_checkpoints"):
        if int(t[n]) < 1:
            errors.append(f"config.train.{n}={t[n]} must be >= 1.")
    if "eval_every" in t:
        errors.append("config.train.eval_every moved to config.eval.every (FID during training; see "
                      "imm_jax/evaluation/in_training.py).")
    errors.extend(_eval_errors(config))
    vae_path = str(config.get("vae", {}).get("path", "") or "")
    if vae_path and not os.path.isfile(os.path.join(vae_path, "config.json")):
        errors.append(f"config.vae.path={vae_path!r} is not a local diffusers VAE directory (no config.json there); "
                      "give the directory holding config.json and diffusion_pytorch_model.safetensors "
                      "(nothing is downloaded), or leave it empty.")
    for n in ("steps",):
        for s in tuple(config.sample[n]):
            if int(s) < 1:
                errors.append(f"config.sample.steps contains {s}; each must be >= 1.")
    if errors:
        raise ConfigError("Invalid config:\n  - " + "\n  - ".join(errors))


def _eval_errors(config) -> list[str]:
    """config.eval (optional): FID during training."""
    from imm_jax.evaluation.in_training import REFERENCE_SOURCES
    ev = config.get("eval", None)
    if ev is None or not int(ev.get("every", 0) or 0):
        return []
    missing = [n for n in EVAL_FIELDS if n not in ev and n not in ("ref_stats", "weights", "seed", "ref_split")]
    if missing:
        return [f"config.eval.{n} is missing (needed when config.eval.every > 0)." for n in missing]
    errors = []
    if int(ev.every) < 0:
        errors.append(f"config.eval.every={ev.every} must be >= 0 (0 turns FID during training off).")
    if int(ev.num_samples) < 2:
        errors.append(f"config.eval.num_samples={ev.num_samples}: FID needs at least 2 samples (1000+ to mean much).")
    if int(ev.batch_size) < 1:
        errors.append(f"config.eval.batch_size={ev.batch_size} must be >= 1.")
    if not tuple(ev.steps) or any(int(s) < 1 for s in tuple(ev.steps)):
        errors.append(f"config.eval.steps={tuple(ev.steps)}: give one or more step counts >= 1, e.g. (1, 2).")
    ref_stats = ev.get("ref_stats", "") or ""
    if config.data.source == "latents":
        if not str(config.get("vae", {}).get("path", "") or ""):
            errors.append("config.eval.every > 0 for a latent model needs config.vae.path (a local diffusers SD-VAE "
                          "directory) to decode samples; set it, or --config.eval.every=0 and evaluate exported "
                          "samples with python -m imm_jax.evaluation.")
        if not (ref_stats and os.path.isfile(ref_stats)):
            errors.append(f"config.eval.ref_stats={ref_stats!r} does not exist: a latent model's reference images "
                          "cannot be read from its latents; make the statistics of the real images with "
                          "python -m imm_jax.evaluation stats.")
    elif not (ref_stats and os.path.isfile(ref_stats)) and config.data.source not in REFERENCE_SOURCES:
        errors.append(f"config.eval.ref_stats={ref_stats!r} does not exist and reference images cannot be read from "
                      f"data.source={config.data.source!r}; make them with python -m imm_jax.evaluation stats.")
    elif int(ev.ref_images) < 2 and not (ref_stats and os.path.isfile(ref_stats)):
        errors.append(f"config.eval.ref_images={ev.ref_images}: reference statistics need at least 2 images.")
    return errors
