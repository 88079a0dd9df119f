"""Loaders of in-memory tensors: whole batches with one index op, in an order that resumes mid-epoch."""

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class TensorBatches(Dataset):
    """Images and targets held as two tensors; a DataLoader fetches a whole batch with one index op."""

    def __init__(self, images: Tensor, targets: Tensor):
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.targets[index]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        # The index goes to the images' device first, without waiting: a CPU index into GPU tensors would be a
        # blocking copy (the host waits for the GPU's queue) at every batch. From pageable memory the copy is
        # staged before `to` returns, so the list's tensor may go.
        index = torch.tensor(indices).to(self.images.device, non_blocking=True)
        return self.images[index], self.targets[index]


class EpochShuffle(DistributedSampler):
    """DistributedSampler's order (a new one each epoch, from the seed and the epoch number alone; under DDP,
    this rank's shard), which can start part-way through an epoch: `skip`, set by `ResumableLoader`.

    A stock RandomSampler draws from the global RNG, which a resumed run has not replayed. Being a
    DistributedSampler also makes Lightning keep it as it is under DDP (it would wrap anything else).
    """

    def __init__(self, size: int, seed: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.skip: tuple[int, int] | None = None  # (epoch, samples of this rank's shard already trained on)

    def __iter__(self):
        start = self.skip[1] if self.skip and self.skip[0] == self.epoch else 0
        self.skip = None
        return iter(list(super().__iter__())[start:])


class ResumableLoader(DataLoader):
    """A DataLoader whose place in the epoch goes into checkpoints, so a run stopped mid-epoch (SIGTERM,
    Ctrl-C) resumes with the next batch, not with a fresh pass. Lightning saves and restores the state of
    any loader that has `state_dict`/`load_state_dict`.

    The place is Lightning's count of completed batches (`trained_batches`, set by the data module):
    the loader's own count of batches handed out runs ahead of it, since Lightning fetches one batch early.
    Under DDP the ranks step in lockstep, so the count rank 0 saves is every rank's place in its own shard
    (resuming mid-epoch needs the same number of ranks; at an epoch's end any number will do). The
    sampler's seed goes in too: a run resumed without the same `--seed_everything` keeps its epoch orders.
    """

    trained_batches = staticmethod(lambda: 0)

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "samples": self.trained_batches() * self.batch_size,
                "seed": self.sampler.seed}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.sampler.skip = (state["epoch"], state["samples"])
        self.sampler.seed = state.get("seed", self.sampler.seed)


def keep_batch(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """collate_fn for TensorBatches: the batch is already stacked."""
    return batch
