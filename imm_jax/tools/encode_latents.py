"""Pre-encode an image dataset into SD-VAE posterior latents (mean, std) + labels, as NumPy shards.

    # ImageNet through TFDS (prepared once; see launch/README.md):
    python -m imm_jax.tools.encode_latents --source=tfds --tfds_name=imagenet2012 --split=train \
        --tfds_data_dir=/data/tfds --vae=/models/sd-vae-ft-ema --out=/data/imagenet256_latents
    # or a folder with one sub-folder per class (e.g. ILSVRC2012 train/nXXXXXXXX/*.JPEG):
    python -m imm_jax.tools.encode_latents --source=folder --data_dir=/data/imagenet/train \
        --vae=/models/sd-vae-ft-ema --out=/data/imagenet256_latents

Each image gets the ADM centre crop to --resolution (no flip), goes through the VAE encoder, and its posterior
mean and std (raw VAE units, (res/8, res/8, 4)) are stored with the label (format: `imm_jax.io.latents`).
Work is split into shards of --shard_size consecutive examples: host h of H encodes shards k with
k % H == h (H, h default to jax.process_count()/process_index(); --multihost initialises jax.distributed),
and each host runs its batches data-parallel over its local devices. Finished shards are skipped, so an
interrupted run resumes by re-running the same command. The host that completes the last shard writes
`index.json` (or run again with --finalize_only).
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import functools
import os
import sys
import time
from typing import Sequence

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM/EDM2 centre crop: halve with BOX filtering while the short side is >= 2*image_size, BICUBIC-resize
    the short side to image_size, then crop the centre square. Returns uint8 (image_size, image_size, 3)."""
    image = image.convert("RGB")
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return np.ascontiguousarray(arr[top:top + image_size, left:left + image_size])


# ------------------------------------------------------------------------------------------------ sources

class FolderSource:
    """root/<class_name>/<image files>; labels are the sorted class-folder indices (ILSVRC synset order)."""

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"--data_dir={root} is not a directory.")
        self.classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if not self.classes:
            raise ValueError(f"--data_dir={root} has no class sub-folders (expected root/<class>/<images>).")
        self.files, self.labels = [], []
        for label, c in enumerate(self.classes):
            names = sorted(f for f in os.listdir(os.path.join(root, c)) if f.lower().endswith(IMAGE_EXTENSIONS))
            self.files += [os.path.join(root, c, f) for f in names]
            self.labels += [label] * len(names)
        if not self.files:
            raise ValueError(f"--data_dir={root}: no images with extensions {IMAGE_EXTENSIONS}.")
        self.description = {"source": "folder", "data_dir": os.path.abspath(root), "classes": self.classes}

    def __len__(self):
        return len(self.files)

    def load(self, i: int) -> tuple[Image.Image, int]:
        with Image.open(self.files[i]) as im:
            im.load()
            return im.copy(), self.labels[i]


class TfdsSource:
    """A TFDS dataset read through `tfds.data_source` (array_record format; no TensorFlow needed to read)."""

    def __init__(self, name: str, split: str, data_dir: str | None, manual_dir: str | None,
                 image_key: str = "image", label_key: str = "label"):
        import tensorflow_datasets as tfds
        kwargs = {}
        if manual_dir:
            kwargs["download_and_prepare_kwargs"] = {
                "download_config": tfds.download.DownloadConfig(manual_dir=manual_dir)}
        try:
            self.ds = tfds.data_source(name, split=split, data_dir=data_dir, download=bool(manual_dir), **kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised with what to do
            raise RuntimeError(
                f"tfds.data_source({name!r}, split={split!r}, data_dir={data_dir!r}) failed: {e}\n"
                f"Prepare the dataset once in array_record format, e.g. `tfds build {name} "
                f"--manual_dir=<dir with the ILSVRC2012 tars> --file_format=array_record "
                f"--data_dir=<tfds dir>` (see launch/README.md), or use --source=folder.") from e
        self.image_key, self.label_key = image_key, label_key
        self.description = {"source": "tfds", "name": name, "split": split}

    def __len__(self):
        return len(self.ds)

    def load(self, i: int) -> tuple[Image.Image, int]:
        ex = self.ds[i]
        return Image.fromarray(np.asarray(ex[self.image_key])), int(ex[self.label_key])


# ------------------------------------------------------------------------------------------------ encoding

def _make_encoder(module, params, devices):
    """jit-compiled uint8 (B,H,W,3) -> (mean, std), batch sharded over `devices`, params replicated."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from imm_jax.networks import vae
    mesh = Mesh(np.asarray(devices), ("data",))
    batch_sharding = NamedSharding(mesh, P("data"))
    params = jax.device_put(params, NamedSharding(mesh, P()))
    fn = jax.jit(functools.partial(vae.encode_images, module), in_shardings=(NamedSharding(mesh, P()),
                                                                            batch_sharding),
                 out_shardings=(batch_sharding, batch_sharding))

    def encode(images: np.ndarray):
        mean, std = fn(params, jax.device_put(images, batch_sharding))
        return np.asarray(mean), np.asarray(std)
    return encode


def encode_dataset(source, module, params, out: str, *, resolution: int = 256, batch_size: int = 64,
                   shard_size: int = 5000, host_index: int = 0, num_hosts: int = 1, storage_dtype="float32",
                   workers: int = 8, devices=None, metadata=None, log_every: int = 20, log=print) -> bool:
    """Encodes this host's unfinished shards of `source` into `out`; returns True if index.json got written.

    batch_size is the per-host batch (a multiple of the number of local devices).
    """
    import jax
    from imm_jax.io import latents
    devices = list(devices or jax.local_devices())
    if batch_size % len(devices):
        raise ValueError(f"batch size {batch_size} must be a multiple of the {len(devices)} local devices.")
    if not 0 <= host_index < num_hosts:
        raise ValueError(f"host_index={host_index} must be in [0, num_hosts={num_hosts}).")
    n = len(source)
    ranges = latents.shard_ranges(n, shard_size)
    mine = [k for k in range(len(ranges)) if k % num_hosts == host_index]
    todo = [k for k in mine if not latents.shard_is_done(out, k)]
    total_images = sum(ranges[k][1] - ranges[k][0] for k in todo)
    log(f"[host {host_index}/{num_hosts}] {n} examples in {len(ranges)} shards; this host: {len(mine)} shards, "
        f"{len(mine) - len(todo)} already done, {len(todo)} to encode ({total_images} images) on "
        f"{len(devices)} device(s), batch {batch_size}.")
    os.makedirs(out, exist_ok=True)
    encode = _make_encoder(module, params, devices) if todo else None

    def load(i):
        image, label = source.load(i)
        return center_crop_arr(image, resolution), label

    done_images, t0 = 0, time.time()
    with futures.ThreadPoolExecutor(max(1, workers)) as pool:
        for si, k in enumerate(todo):
            start, stop = ranges[k]
            batches = [list(range(b, min(b + batch_size, stop))) for b in range(start, stop, batch_size)]
            pending = [pool.submit(load, i) for i in batches[0]]
            means, stds, labels = [], [], []
            for bi, idx in enumerate(batches):
                items = [f.result() for f in pending]
                if bi + 1 < len(batches):  # overlap decoding of the next batch with this one's encode
                    pending = [pool.submit(load, i) for i in batches[bi + 1]]
                imgs = np.stack([im for im, _ in items])
                if len(idx) < batch_size:  # pad the tail batch; the padding is dropped below
                    imgs = np.concatenate([imgs, np.repeat(imgs[-1:], batch_size - len(idx), axis=0)])
                mean, std = encode(imgs)
                means.append(mean[:len(idx)])
                stds.append(std[:len(idx)])
                labels += [lab for _, lab in items]
                done_images += len(idx)
                if log_every and (bi + 1) % log_every == 0:
                    rate = done_images / max(time.time() - t0, 1e-9)
                    log(f"[host {host_index}] shard {k} batch {bi + 1}/{len(batches)}: {done_images}/"
                        f"{total_images} images, {rate:.1f} img/s, ETA {(total_images - done_images) / rate / 60:.1f} min")
            latents.write_shard(out, k, start, np.concatenate(means), np.concatenate(stds),
                                np.asarray(labels, np.int32), storage_dtype)
            rate = done_images / max(time.time() - t0, 1e-9)
            log(f"[host {host_index}] wrote shard {k} ({si + 1}/{len(todo)} of this host): {done_images}/"
                f"{total_images} images, {rate:.1f} img/s")
    finished = latents.finalize(out, n, shard_size, metadata)
    if finished:
        log(f"[host {host_index}] all {len(ranges)} shards present: wrote {os.path.join(out, latents.INDEX_NAME)}")
    else:
        missing = sum(not latents.shard_is_done(out, k) for k in range(len(ranges)))
        log(f"[host {host_index}] done with this host's shards; {missing} shard(s) still missing elsewhere. "
            f"The last host to finish writes index.json (or re-run with --finalize_only).")
    return finished


# ------------------------------------------------------------------------------------------------ CLI

def _parser():
    p = argparse.ArgumentParser(prog="python -m imm_jax.tools.encode_latents",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=("tfds", "folder"), required=True)
    p.add_argument("--data_dir", help="folder source: root with one sub-folder per class")
    p.add_argument("--tfds_name", default="imagenet2012")
    p.add_argument("--split", default="train")
    p.add_argument("--tfds_data_dir", default=None, help="TFDS data_dir holding the prepared dataset")
    p.add_argument("--manual_dir", default=None,
                   help="TFDS manual_dir with the ILSVRC2012 tars; when set, prepares the dataset if needed")
    p.add_argument("--vae", required=True, help="local diffusers AutoencoderKL dir (config.json + safetensors)")
    p.add_argument("--vae_dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--out", required=True, help="output latent directory (local path or mounted shared FS)")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--per_device_batch", type=int, default=32)
    p.add_argument("--shard_size", type=int, default=5000)
    p.add_argument("--storage_dtype", default="float32", choices=("float32", "float16"))
    p.add_argument("--workers", type=int, default=min(32, os.cpu_count() or 1),
                   help="threads decoding/cropping images")
    p.add_argument("--multihost", action="store_true",
                   default=os.environ.get("IMM_JAX_MULTIHOST", "0") not in ("", "0", "false", "False"),
                   help="call jax.distributed.initialize() first (default from env IMM_JAX_MULTIHOST)")
    p.add_argument("--host_index", type=int, default=None, help="default jax.process_index()")
    p.add_argument("--num_hosts", type=int, default=None, help="default jax.process_count()")
    p.add_argument("--limit", type=int, default=None, help="encode only the first N examples (smoke tests)")
    p.add_argument("--log_every", type=int, default=20, help="progress line every N batches")
    p.add_argument("--finalize_only", action="store_true", help="only write index.json if all shards exist")
    return p


class _Limited:
    def __init__(self, source, n):
        self.source, self.n = source, min(n, len(source))
        self.description = dict(source.description, limit=n)

    def __len__(self):
        return self.n

    def load(self, i):
        return self.source.load(i)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import jax
    if args.multihost:
        jax.distributed.initialize()
    host_index = jax.process_index() if args.host_index is None else args.host_index
    num_hosts = jax.process_count() if args.num_hosts is None else args.num_hosts
    from imm_jax.io import latents
    from imm_jax.networks import vae

    if args.source == "folder":
        if not args.data_dir:
            raise SystemExit("--source=folder needs --data_dir=<root with one sub-folder per class>.")
        source = FolderSource(args.data_dir)
    else:
        source = TfdsSource(args.tfds_name, args.split, args.tfds_data_dir, args.manual_dir)
    if args.limit is not None:
        source = _Limited(source, args.limit)
    module, params = vae.load_pretrained(args.vae, dtype=args.vae_dtype)
    f = module.config.downsample_factor
    if args.resolution % f:
        raise SystemExit(f"--resolution={args.resolution} must be a multiple of the VAE factor {f}.")
    metadata = dict(source.description, resolution=args.resolution, crop="adm_center_crop", flip=False,
                    vae=os.path.abspath(args.vae), vae_config=module.config.to_diffusers(),
                    vae_dtype=args.vae_dtype, units="raw VAE posterior (normalise with imm_jax.networks.vae)")
    if args.finalize_only:
        ok = latents.finalize(args.out, len(source), args.shard_size, metadata)
        print("wrote index.json" if ok else "some shards are still missing; index.json not written", flush=True)
        return 0 if ok else 1
    batch = args.per_device_batch * jax.local_device_count()
    encode_dataset(source, module, params, args.out, resolution=args.resolution, batch_size=batch,
                   shard_size=args.shard_size, host_index=host_index, num_hosts=num_hosts,
                   storage_dtype=args.storage_dtype, workers=args.workers, metadata=metadata,
                   log_every=args.log_every, log=functools.partial(print, flush=True))
    return 0


if __name__ == "__main__":
    from imm_jax import errors
    sys.exit(errors.run("python -m imm_jax.tools.encode_latents", main))
