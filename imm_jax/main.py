r"""Command line: train or sample with an ml_collections config.

    python -m imm_jax.main --config=configs/fashion_mnist.py --workdir=runs/fmnist
    python -m imm_jax.main --config=configs/imagenet256.py:variant=XL/2,a=2,temb=stride --workdir=DIR \
        --config.data.path=/data/latents --config.data.batch_size=1024
    python -m imm_jax.main --mode=sample --workdir=runs/fmnist --num_samples=64 --steps=2

Any config field can be overridden with --config.<section>.<name>=value (unknown names are rejected).
Training resumes automatically from the latest checkpoint in --workdir. SIGTERM writes a checkpoint and exits.
Multi-host (TPU pods, GPU clusters): pass --multihost or set IMM_JAX_MULTIHOST=1 on every process; then
jax.distributed.initialize() runs first (arguments from the cluster environment, or from
--coordinator_address/--num_processes/--process_id).
"""
from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

from imm_jax import config_files, errors

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", config_files.resolve("configs/fashion_mnist.py"),
    "Config file (configs/X.py[:args]; the installed configs are found from any directory). Default: "
    "configs/fashion_mnist.py (the embedded default).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples and the resolved config.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "tune"],
                  "train: train (resuming if workdir has checkpoints). sample: write samples from the latest "
                  "checkpoint's EMA params (config read from the checkpoint).")
flags.DEFINE_bool("multihost", os.environ.get("IMM_JAX_MULTIHOST", "0") not in ("", "0", "false", "False"),
                  "Call jax.distributed.initialize() before anything else (default from env IMM_JAX_MULTIHOST).")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0 (else auto-detected).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes (else auto-detected).")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's id (else auto-detected).")
flags.DEFINE_integer("num_samples", 64, "sample mode: number of images.")
flags.DEFINE_multi_integer("steps", None, "sample mode: sampling steps (repeatable); default config.sample.steps.")
flags.DEFINE_float("cfg_scale", None, "sample mode: guidance weight; default config.sample.cfg_scale.")
flags.DEFINE_float("ema", None, "sample/tune mode: which EMA decay to use; default config.train.sample_ema, else the fastest.")
flags.DEFINE_integer("seed", 0, "sample mode: random seed.")
flags.DEFINE_string("out", None, "sample mode: output directory (default WORKDIR/samples_cli).")
flags.DEFINE_integer("chunk_size", 1000, "sample mode: samples per resumable chunk.")
flags.DEFINE_integer("batch_size", 250, "sample mode: samples per device batch (over all local devices).")
flags.DEFINE_string("sampler", None, "sample mode: pushforward | restart (IMM), euler | heun (FM); "
                    "default: the config's sample.sampler.")
flags.DEFINE_string("grid", None, "sample/tune mode: time grid uniform | edm | etas (default config.sample.grid).")
flags.DEFINE_enum("tune_sampler", None, ["pushforward", "euler"],
                  "tune mode: sampler to tune (MTEO); default pushforward for IMM models, euler for FM models.")
flags.DEFINE_integer("tune_iters", 300, "tune mode: optimisation steps.")
flags.DEFINE_enum("tune_loss", "mmd", ["mmd", "l2", "l1", "pseudo_huber"],
                  "tune mode: objective; mmd (IMM's grouped MMD to the teacher's states, the default) or a "
                  "per-trajectory distance (docs/RESULTS.md compares them).")
flags.DEFINE_float("tune_lr", 1e-2, "tune mode: Adam learning rate of the tuned vectors.")
flags.DEFINE_integer("tune_batch_size", 64, "tune mode: trajectories per optimisation step.")
flags.DEFINE_integer("tune_trajectories", 1024, "tune mode: teacher trajectories to train on.")
flags.DEFINE_integer("tune_eval", 256, "tune mode: held-out teacher trajectories for the reported loss.")
flags.DEFINE_integer("tune_teacher_steps", None,
                     "tune mode: teacher steps (default 128 Euler for FM models, 16 pushforward for IMM models).")
flags.DEFINE_string("vae_path", None, "sample mode, latent models: local diffusers SD-VAE directory to decode with "
                    "(default: the checkpoint config's vae.path).")
flags.DEFINE_bool("tuned", False, "sample mode: use the tuned time embeddings saved beside the checkpoint by "
                  "--mode=tune (error if none matches the sampler/steps/grid).")


def _init_distributed():
    import jax
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
        # CPU processes need a collectives backend to talk to each other.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {k: v for k, v in dict(coordinator_address=FLAGS.coordinator_address,
                                    num_processes=FLAGS.num_processes, process_id=FLAGS.process_id).items()
              if v is not None}
    jax.distributed.initialize(**kwargs)
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def sample_main(workdir: str):
    """Per step count: <out>/<N>step/samples.npz (ADM layout: arr_0 uint8 NHWC, arr_1 labels) and grid.png."""
    from imm_jax.inference import api, export
    sampler = api.load(workdir, ema=FLAGS.ema, tuned=FLAGS.tuned or None, vae_path=FLAGS.vae_path)
    if sampler.is_latent:
        sampler.vae_dir()  # a missing or wrong VAE path fails before any sampling
    steps_list = tuple(FLAGS.steps or sampler.config.sample.steps)
    out = FLAGS.out or os.path.join(workdir, "samples_cli")
    for steps in steps_list:
        path = export.export_samples(
            workdir, os.path.join(out, f"{steps}step"), FLAGS.num_samples, chunk_size=FLAGS.chunk_size,
            batch_size=min(FLAGS.batch_size, FLAGS.chunk_size), sampler_obj=sampler, steps=int(steps),
            cfg_scale=FLAGS.cfg_scale, seed=FLAGS.seed, sampler=FLAGS.sampler, grid=FLAGS.grid)
        print(f"wrote {FLAGS.num_samples} {steps}-step samples (EMA {sampler.ema}) to {path}", flush=True)


def tune_main(workdir: str):
    from imm_jax.training import checkpointing
    from imm_jax.core import losses, sampling
    from imm_jax.inference import tuning
    config, _ = checkpointing.restore_for_sampling(workdir)
    sampler = FLAGS.tune_sampler or sampling.default_sampler(losses.objective_name(config))
    for n in tuple(FLAGS.steps or config.sample.steps):
        tuning.tune_main(workdir, os.path.join(workdir, "tune"), ema=FLAGS.ema, sampler=sampler,
                         steps=int(n), num_steps=FLAGS.tune_iters, lr=FLAGS.tune_lr, loss=FLAGS.tune_loss,
                         batch_size=FLAGS.tune_batch_size, num_trajectories=FLAGS.tune_trajectories,
                         num_eval=FLAGS.tune_eval, teacher_steps=FLAGS.tune_teacher_steps,
                         grid=FLAGS.grid or config.sample.grid, seed=FLAGS.seed + 1)


def main(argv):
    if len(argv) > 1:
        raise errors.UserError(f"unexpected arguments {argv[1:]}: flags are --name=value (see --help).")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # keep library INFO chatter out of the progress lines
    if FLAGS.workdir is None:
        raise errors.UserError("--workdir is required (where checkpoints, metrics and samples go).")
    if FLAGS.multihost:
        _init_distributed()
    from imm_jax.kernels import host_memory
    host_memory.keep_freed_memory()  # CPU-only processes: before the backends start, after distributed init
    if FLAGS.mode == "sample":
        return sample_main(FLAGS.workdir)
    if FLAGS.mode == "tune":
        return tune_main(FLAGS.workdir)
    if FLAGS.config is None:
        raise errors.UserError("--config=configs/X.py is required.")
    from imm_jax.training import train
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


def _parse_flags(argv):
    prog = "python -m imm_jax.main"
    argv = errors.run(prog, config_files.resolve_argv, argv)
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError):  # ml_collections' bare "'name'" for an unknown --config.a.b: say which and what exists
        spec = config_files.flag_value(argv) or config_files.resolve("configs/fashion_mnist.py")
        errors.run(prog, lambda: config_files.check_overrides(config_files.load(spec), argv))
        raise


def _main(argv):
    errors.run("python -m imm_jax.main", main, argv, tracebacks=FLAGS.verbosity >= 1)


if __name__ == "__main__":
    app.run(_main, flags_parser=_parse_flags)
