"""CIFAR-10 (unconditional, 32x32x3), the paper's recipe (spec §4, Table 5).

    TFDS_DATA_DIR=/data/tfds python -m imm_jax.main --config=configs/cifar10.py --workdir=runs/cifar10

Data: tfds `cifar10` prepared as array_record (`tfds build cifar10 --file_format=array_record` where internet
is available; TensorFlow is not needed to read it). Set TFDS_DATA_DIR or --config.data.path.
Recipe: DDPM++ (55.7M + s-embedding), Simple-EDM + OT-FM, sigma_d 0.5, t ~ U(0.006, 0.994), M = 4, k = 15,
a = 1, b = 5, Laplace kernel, dropout 0.2, x-flip, RAdam lr 1e-4 (0.9, 0.999, eps 1e-8), no weight decay,
batch 4096, 400K steps, EMA 0.9999. Sampling: 1 step [0.994, 0.006]; 2 steps with eta(t1) = 1.4.
Not implemented: EDM's AugmentPipe (the paper enables it; its probability is unspecified, spec §4).
"""
import ml_collections

from imm_jax import networks


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = networks.unet_config(image_size=32, in_channels=3, num_classes=0)
    c.imm = ml_collections.ConfigDict(dict(
        objective="imm", schedule="fm", f_type="simple_edm", sigma_d=0.5, temb="s", time_scale=1000.0,
        t_min=0.006,
        t_max=0.994, particles=4, k=15, min_gap=0.0, mapping="eta", a=1.0, b=5.0, kernel="laplace",
        label_dropout=0.0, dropout_keys="independent", fused=False,
        k_end=ml_collections.config_dict.placeholder(int), k_ramp_steps=0))
    c.data = ml_collections.ConfigDict(dict(
        source="tfds", name="cifar10", path="", split="train", batch_size=4096, random_flip=True, seed=0,
        prefetch=2, pad=0, synthetic_size=1024))
    c.optim = ml_collections.ConfigDict(dict(
        name="radam", lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=0, grad_clip=0.0))
    c.train = ml_collections.ConfigDict(dict(
        num_steps=400_000, log_every=100, ckpt_every=5000, keep_checkpoints=3, sample_every=5000,
        ema_decays=(0.9999, 0.999), sample_ema=0.9999,
        async_checkpoints=True, max_train_minutes=0.0))
    # FID during training on the 10k CIFAR-10 test images (tfds); the paper's FID uses 50k samples vs the train set
    # (python -m imm_jax.evaluation on exported samples).
    c.eval = ml_collections.ConfigDict(dict(
        every=20000, num_samples=10000, steps=(1, 2), batch_size=500, ref_split="test", ref_images=10000,
        ref_stats="", weights="", seed=1))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, fsdp_min_size=2**18))
    c.sample = ml_collections.ConfigDict(dict(
        steps=(1, 2), grid="etas", mid_etas=ml_collections.ConfigDict(dict(s1=(), s2=(1.4,))),
        cfg_scale=1.0, sampler="pushforward", grid_size=64, seed=42))
    return c
