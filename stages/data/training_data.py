"""What a MeanFlow training stage (the MeanFlow teacher, MeanFlow post-training) draws its batches
from: the prepared dataset's pixels, or (`--latents`, the latent rows) the encoded dataset's
posterior draws through stages/data/latents.py, with their labels either way.

Both give `batch(step, part, generator)` -> (x [B, C, H, W] float32 on the device, labels [B] int64
on the device), `shape` = (C, H) of what the network sees, `state` (what the training state saves
beside the model: the latent stream's position, or None for pixels drawn by index) and `sha256` of
the input file that identifies the run.
"""

import torch

from stages.data import datasets, latents
from stages.data import labels as class_labels
from stages.files import atomic


class Pixels:
    """The prepared dataset on the device; each step draws `local` images by index from `generator`."""

    def __init__(self, path, accelerator, batch, key, batch_per_gpu=None):
        self.data, _, self.labels = load_images(path, accelerator, batch, key, labels=True)
        self.local, self.micro_batches = split_batch(batch, batch_per_gpu, accelerator.num_processes,
                                                          key.rsplit(".", 1)[0])
        self.shape = (self.data.shape[1], self.data.shape[2])
        self.state, self.sha256, self.path = None, atomic.sha256_file(path), path

    def expect_classes(self, num_classes):
        """Refuse, once, a dataset with labels a network of `num_classes` classes cannot take."""
        class_labels.check_dataset(self.labels.cpu().numpy(), num_classes, self.path)

    def batch(self, step, part, generator):
        pick = torch.randint(len(self.data), (self.local,), generator=generator).to(self.data.device)
        return self.data[pick], self.labels[pick]


class Latents:
    """The encoded dataset of a latent row: each step takes the next `local` encoded images of this
    rank's stream and draws one posterior sample of each, folded from (seed, step, part), whitened
    as the row's `latents` section says (stages/data/latents.py LatentBatches)."""

    def __init__(self, manifest, latents_cfg, accelerator, batch, key, seed, batch_per_gpu=None, fast=False,
                 shuffle_buffer=1000):
        _, paths, counts = latents.manifest_shards(manifest, fast=fast)
        world, rank = accelerator.num_processes, accelerator.process_index
        if batch % world:
            raise ValueError(f"{key} {batch} is not divisible by {world} processes")
        self.local, self.micro_batches = split_batch(batch, batch_per_gpu, world, key.rsplit(".", 1)[0])
        self.state = latents.LatentBatches(paths, counts, seed, self.local, latents_cfg, rank, world,
                                           shuffle_buffer, accelerator.device)
        channels2, height, _ = latents.read_first(paths[0]).shape  # the first sample only
        self.shape = (channels2 // 2, height)
        self.sha256, self.path = atomic.sha256_file(manifest), manifest

    def expect_classes(self, num_classes):
        """The labels are in the shards: each batch's are checked on the host as it is read, before
        they reach the device (no device sync in the training step)."""
        if num_classes:
            self.state.label_check = lambda labels: check_labels(labels, num_classes, self.path)

    def batch(self, step, part, generator):
        return self.state.next(step, part)


def open_training_data(args, cfg, accelerator, batch, key, seed, batch_per_gpu=None):
    """Pixels of `args.dataset`, or latents of `args.latents` (with cfg["latents"]) when given."""
    if getattr(args, "latents", None):
        if "latents" not in cfg:
            raise ValueError("--latents needs the row's `latents` section in the stage's config (the whitening)")
        return Latents(args.latents, cfg["latents"], accelerator, batch, key, seed, batch_per_gpu,
                       fast=getattr(args, "verify", "full") == "fast")
    return Pixels(args.dataset, accelerator, batch, key, batch_per_gpu)


def check_labels(labels, num_classes, where):
    """Refuse labels a class-conditional network cannot take (unlabelled -1, more classes)."""
    if num_classes and bool(((labels < 0) | (labels >= num_classes)).any()):
        bad = labels[(labels < 0) | (labels >= num_classes)][:5].tolist()
        raise ValueError(f"{where}: labels {bad} outside 0..{num_classes - 1} of this class-conditional network; "
                         "a conditional row needs a labelled dataset with at most network.num_classes classes")


def split_batch(batch, batch_per_gpu, world, key, unit="samples"):
    """(units per micro-batch, micro-batches per step) of one process's share of the global
    `batch` (config section `key`; `unit`: what batch counts, e.g. the trajectories of a
    mid-training batch): the share is batch / world, in micro-batches of `batch_per_gpu` (None:
    one micro-batch of the whole share). The global batch is the row's whatever the number of
    processes; a split that does not divide evenly is refused."""
    if batch % world:
        raise ValueError(f"{key}.batch: {batch} {unit} per step are not divisible by {world} processes")
    share = batch // world
    per = share if batch_per_gpu is None else min(batch_per_gpu, share)
    if share % per:
        raise ValueError(f"{key}.batch_per_gpu: {batch_per_gpu} {unit} per micro-batch do not divide the {share} "
                         f"{unit} per process ({batch} over {world} processes); choose a divisor of {share}")
    return per, share // per


def load_images(path, accelerator, batch, key, labels=False):
    """The prepared dataset at `path` as a [-1, 1] tensor on the device, and this process's share
    of the global `batch` (config key `key`), which must split evenly over the processes; with
    `labels`, also the class indices (int64 [N] on the device, -1 where unlabelled)."""
    images, classes = datasets.load(path)
    world = accelerator.num_processes
    if batch % world:
        raise ValueError(f"{key} {batch} is not divisible by {world} processes")
    out = DeviceImages(images, accelerator.device), batch // world
    return (*out, torch.from_numpy(classes.astype("int64")).to(accelerator.device)) if labels else out


class DeviceImages:
    """A prepared dataset on the device as uint8 (ImageNet-64: 16 GB, not 63 GB of float32), read
    as [-1, 1] float32 batches: data[indices] is datasets.to_model_range of those images."""

    def __init__(self, images_uint8, device):
        self.images = torch.from_numpy(images_uint8).to(device)
        self.device, self.shape = self.images.device, self.images.shape

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index].to(torch.float32) / 127.5 - 1.0
