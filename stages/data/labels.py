"""Class labels for class-conditional networks (EDM2's, label_dim > 0).

Labels travel as class indices (int64, -1 where a dataset image has none) and reach a network as
one-hot floats [B, label_dim] (Precond(x, sigma, labels)). Where no data image fixes the class (a
trajectory started from pure noise, a sample), the class is uniform random and a pure function of
(seed, index), as the ImageNet-512 code draws its random labels: a trajectory or an image is the
same whatever the batch or job split. An unconditional network (label_dim 0) takes no labels, and
nothing it writes (shards, samples) holds a label field.
"""

import numpy as np
import torch
import torch.nn.functional as F

from stages.core import rng


def label_dim_of(net):
    """The number of classes of a (possibly DDP- or EMA-wrapped) Precond; 0 for unconditional."""
    net = getattr(net, "module", net)
    return int(getattr(net, "label_dim", 0) or 0)


def random_label(seed, index, label_dim, purpose="label"):
    """A uniform class in [0, label_dim) folded from (seed, index, purpose)."""
    return int(torch.randint(label_dim, (1,), generator=rng.generator(seed, index, purpose)))


def one_hot(classes, label_dim, device=None, what="labels"):
    """Class indices -> one-hot float32 [B, label_dim]; None for an unconditional network (label_dim 0).
    An index outside [0, label_dim) (an unlabelled -1, a dataset with more classes) is refused."""
    if not label_dim:
        return None
    classes = torch.as_tensor(np.asarray(classes), dtype=torch.int64)
    bad = (classes < 0) | (classes >= label_dim)
    if bool(bad.any()):
        raise ValueError(f"{what}: class {int(classes[bad][0])} is not in [0, {label_dim}) for this "
                         f"class-conditional network; a conditional row needs a labelled dataset "
                         f"(dataset.source imagenet_folder, cifar10, digits) with at most {label_dim} classes")
    out = F.one_hot(classes, label_dim).to(torch.float32)
    return out if device is None else out.to(device)


def dataset_one_hot(classes, label_dim):
    """One-hot float32 of class indices already on the device, from a dataset `check_dataset` passed
    once at the start: no per-step copy to the host and no re-check (a training step's hot path).
    None for an unconditional network."""
    return F.one_hot(classes, label_dim).to(torch.float32) if label_dim else None


def check_dataset(labels, label_dim, path):
    """Refuse a dataset a conditional network cannot use: unlabelled images or too many classes."""
    if not label_dim:
        return
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= label_dim):
        raise ValueError(f"{path}: labels span [{labels.min()}, {labels.max()}] but the network is "
                         f"class-conditional with label_dim {label_dim} (-1 = unlabelled): prepare a labelled "
                         f"dataset or set network.label_dim to the number of classes")
