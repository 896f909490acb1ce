"""Trajectory shards: WebDataset tars with one sample per trajectory.

Sample `<index:09d>`: `states.npy` (all solver states, [K+1, C, H, W], fp16 by default),
`sigmas.npy` (float64 [K+1]; a flow-time trajectory of a MeanFlow teacher stores `times.npy`,
flow times t in [0, 1] noise first, instead), `meta.json` (index, seed, data index if the start
used data, class `label` of a class-conditional teacher).
Tars are written with fixed metadata (mtime 0, fixed owner) and pre-encoded members, so equal
trajectories give equal bytes (the solver's states may differ in their last bits between machines
and thread counts: stages/trajectory_shard.py); a shard is written under a temporary name and renamed.
"""

import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds

from stages.files import atomic, store


def encode_npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes):
    return np.load(io.BytesIO(data), allow_pickle=False)


def in_background(iterable, depth=2):
    """Iterate `iterable` in a thread, `depth` items ahead of the consumer.

    The trajectory stage's producer is the teacher's solve (torch releases the GIL inside its ops)
    and its consumer encodes and writes tar members (Python): run one beside the other, the writing
    hides behind the solve instead of adding to it. An exception in the producer is raised in the
    consumer, at the item where it happened.
    """
    import queue
    import threading

    items, done = queue.Queue(maxsize=depth), object()
    stop = threading.Event()

    def produce():
        try:
            for item in iterable:
                while not stop.is_set():
                    try:
                        items.put((True, item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            items.put((True, done))
        except BaseException as e:  # handed to the consumer, never swallowed
            items.put((False, e))

    thread = threading.Thread(target=produce, name="shard-producer", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = items.get()
            if not ok:
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join()


GRID_NAMES = ("sigmas", "times")


def write_shard(path, samples, background=False, grid_name="sigmas"):
    """Write an iterable of (index, states, grid, meta) to `path` atomically; returns the count.
    The grid is stored as `<grid_name>.npy` (GRID_NAMES: sigmas of an EDM solver, flow times).
    background=True produces the samples in a thread while this one writes (in_background)."""
    if grid_name not in GRID_NAMES:
        raise ValueError(f"write_shard: grid_name {grid_name!r}; known: {list(GRID_NAMES)}")
    items = in_background(samples) if background else samples
    return write_tar(path, ({"__key__": f"{index:09d}", "states.npy": encode_npy(states),
                             f"{grid_name}.npy": encode_npy(sigmas),
                             "meta.json": json.dumps(meta, sort_keys=True).encode()}
                            for index, states, sigmas, meta in items))


def write_tar(path, members):
    """Write WebDataset samples (dicts of member name -> bytes, with `__key__`) to `path` atomically,
    reproducibly (no times or owners of this machine in the tar); returns the count."""
    count = 0
    with atomic.atomic_path(path) as tmp:
        with wds.TarWriter(str(tmp), encoder=False, mtime=0, user="cmt", group="cmt") as sink:
            for member in members:
                sink.write(member)
                count += 1
    return count


def decode_sample(sample, source="?"):
    """Raw WebDataset sample (bytes) -> dict of arrays. A malformed member raises, naming it."""
    key = sample.get("__key__", "?")
    url = sample.get("__url__", source)
    try:
        grids = [name for name in GRID_NAMES if f"{name}.npy" in sample]
        if len(grids) != 1:
            raise KeyError(f"one of {[n + '.npy' for n in GRID_NAMES]} expected, found {len(grids)}")
        return {
            "index": int(key),
            "states": decode_npy(sample["states.npy"]),
            grids[0]: decode_npy(sample[f"{grids[0]}.npy"]),
            "meta": json.loads(sample["meta.json"]),
        }
    except Exception as e:  # a damaged member must stop the job, not be skipped
        raise ValueError(
            f"{url}: trajectory sample {key!r} cannot be decoded ({type(e).__name__}: {e}); "
            "the shard is damaged: " + store.remake_command("<results>/<row>/receipts/shards/<shard>.json")
        ) from e


def read_shard(path):
    """All samples of one shard, in order (tests, spot checks and the teacher's FD ceiling)."""
    pipeline = wds.DataPipeline(
        wds.SimpleShardList([str(path)]),
        wds.tarfile_to_samples(handler=wds.reraise_exception),
    )
    return [decode_sample(s, str(path)) for s in pipeline]


class TrajectoryStream:
    """An endless, reproducible stream of decoded trajectories from `paths`, with a position.

    Epoch e visits the shards in a permutation and shuffles samples in a buffer, both seeded by
    (seed, e), so the stream is a pure function of (paths, seed) and never depends on timing.
    The position (epoch, offset = samples of that epoch handed out) is what a training state
    saves; a stream set to it skips that many samples of the epoch without decoding them and
    continues with exactly the samples an uninterrupted stream would give.
    """

    # how a raw sample becomes an item, and what the items are called in errors (LatentStream's differ)
    decode = staticmethod(decode_sample)
    what = "trajectories"

    def __init__(self, paths, seed, shuffle_buffer=1000, epoch=0, offset=0):
        self.paths = [str(p) for p in paths]
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.epoch, self.offset = epoch, offset
        self._samples = None

    def state_dict(self):
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, position):
        if self._samples is not None:
            raise RuntimeError("set the stream's position before reading from it")
        self.epoch, self.offset = int(position["epoch"]), int(position["offset"])

    def __iter__(self):
        return self

    def __next__(self):
        if self._samples is None:
            self._samples = self._generate()
        return next(self._samples)

    def _epoch(self, epoch):
        from stages.core.rng import fold

        order = np.random.default_rng(fold(self.seed, epoch, "shard-order")).permutation(len(self.paths))
        return wds.DataPipeline(
            wds.SimpleShardList([self.paths[i] for i in order]),
            wds.tarfile_to_samples(handler=wds.reraise_exception),
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=fold(self.seed, epoch, "samples")),
        )

    def _generate(self):
        while True:
            skip, seen = self.offset, 0
            for sample in self._epoch(self.epoch):
                seen += 1
                if seen <= skip:
                    continue
                decoded = self.decode(sample)
                self.offset = seen
                yield decoded
            if seen == 0:
                raise ValueError(f"no {self.what} in {self.paths}")
            if seen < skip:
                raise ValueError(f"epoch {self.epoch} of {self.paths} has {seen} {self.what}, fewer than "
                                 f"the saved position {skip}; the shards changed under a saved state")
            self.epoch, self.offset = self.epoch + 1, 0


class RankTrajectoryStream(TrajectoryStream):
    """Rank `rank` of `world` training processes reads only shards rank, rank + world, ... of
    `paths` (`counts` trajectories each), so ranks never see the same trajectory in an epoch.

    Every rank takes the same number of trajectories per step, so that number, n, is the one
    position they share; a saved position is rank 0's (epoch, offset) as TrajectoryStream keeps it,
    and each rank turns it back into n and then into its own epoch and offset. With world = 1 this
    is TrajectoryStream itself (same seed, same positions).
    """

    shards_key = "trajectories.num_shards"

    def __init__(self, paths, counts, seed, shuffle_buffer, rank, world):
        from stages.core.rng import fold

        paths = [str(p) for p in paths]
        if len(paths) < world:
            raise ValueError(f"{len(paths)} shards of {self.what} cannot be split over {world} training processes "
                             f"(ranks x data workers); make at least {world} shards ({self.shards_key}) "
                             "or train with fewer processes")
        if len(counts) != len(paths):
            raise ValueError(f"{len(counts)} shard counts for {len(paths)} shards")
        self.rank, self.world = rank, world
        self.epoch_len = [sum(counts[r::world]) for r in range(world)]
        super().__init__(paths[rank::world], seed if world == 1 else fold(seed, rank, "rank-stream"),
                         shuffle_buffer)

    def _consumed(self, epoch, offset, rank):
        return epoch * self.epoch_len[rank] + offset

    def state_dict(self):
        if self.world == 1:
            return super().state_dict()
        n = self._consumed(self.epoch, self.offset, self.rank)
        return {"epoch": n // self.epoch_len[0], "offset": n % self.epoch_len[0]}

    def load_state_dict(self, position):
        if self.world == 1:
            return super().load_state_dict(position)
        n = self._consumed(int(position["epoch"]), int(position["offset"]), 0)
        mine = self.epoch_len[self.rank]
        super().load_state_dict({"epoch": n // mine, "offset": n % mine})


def trajectory_stream(paths, seed, shuffle_buffer=1000, start_epoch=0):
    """The stream of `paths` from the start of epoch `start_epoch` (see TrajectoryStream)."""
    return TrajectoryStream(paths, seed, shuffle_buffer, epoch=start_epoch)


def check_manifest(manifest_path, fast=False):
    """Verify every shard listed in a trajectory manifest; returns the shard paths.

    fast=True checks existence and size only; otherwise the sha256 too. A missing, truncated or
    altered shard raises with its path and the rule that regenerates it.
    """
    manifest_path = Path(manifest_path)
    manifest = json.loads(manifest_path.read_text())
    paths = []
    for entry in manifest["shards"]:
        path = Path(entry["path"])
        if not path.exists():
            raise FileNotFoundError(f"{path}: trajectory shard listed in {manifest_path} is missing; "
                                    + store.remake_command(entry.get("receipt")))
        size = path.stat().st_size
        digest = None if fast else atomic.sha256_file(path)
        if size != entry["bytes"]:
            raise ValueError(f"{path}: {size} bytes, manifest {manifest_path} says {entry['bytes']}; "
                             + _fix(path, entry, size, digest))
        if digest is not None and digest != entry["sha256"]:
            raise ValueError(f"{path}: sha256 differs from manifest {manifest_path}; the shard was altered; "
                             + _fix(path, entry, size, digest))
        paths.append(path)
    return manifest, paths


def _fix(path, entry, size, digest):
    """How to repair a shard that differs from this workdir's manifest. If the store's record of it
    differs too and the file matches the record, someone made the shard again after this workdir
    took its receipt (on another GPU the bytes differ): take that copy instead of remaking it."""
    receipt = entry.get("receipt")
    record = store.read_record([path])
    if receipt and record is not None:
        made = record["files"][0]
        if ((made["bytes"], made["sha256"]) != (entry["bytes"], entry["sha256"])
                and size == made["bytes"] and digest in (None, made["sha256"])):
            return (f"the store's copy was made again (by {record['made']['by']} at {record['made']['at']}) "
                    f"after this workdir took it: take the new copy with `snakemake --force {receipt}` (add "
                    "this run's --configfile, --config and --profile options), then rerun the workflow")
    return store.remake_command(receipt)
