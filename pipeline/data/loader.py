"""
A training data stream that can restart at any iteration and give the same batches.

detectron2's samplers are infinite, seeded streams of dataset indices; its augmentations draw from
the global numpy/python RNGs of whichever worker maps a sample, so after a restart they differ.
Here every sample is keyed by its position in the stream: the mapper reseeds the RNGs from
(run seed, position) before augmenting, and batches are consecutive runs of ``batch_size``
positions (no aspect-ratio grouping, whose buffers depend on history). Batch ``i`` is therefore a
pure function of (seed, i), with any number of workers, and a run resumed at iteration ``i``
starts the stream at position ``i * batch_size``.
"""
import itertools
import random
from typing import Callable, Iterator, List, Tuple

import numpy as np
import torch
from detectron2.data import DatasetMapper, get_detection_dataset_dicts
from detectron2.data.samplers import RepeatFactorTrainingSampler, TrainingSampler
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from pipeline.data.validate import DataError


class ImageReadError(DataError):
    """An image that cannot be read during training: one line naming the file. A DataLoader worker's
    exception comes back as the same type with the worker's traceback as its message; only that
    traceback's last line (this message) is kept."""

    def __init__(self, message: str):
        if message.startswith("Caught ") and "\n" in message:
            last = message.strip().splitlines()[-1]
            message = last.split(": ", 1)[1] if last.startswith(f"{__name__}.") else last
        super().__init__(message)


class PositionSampler(Sampler):
    """Yields (dataset index, stream position) from ``start`` on, of an infinite seeded sampler."""

    def __init__(self, sampler: Sampler, start: int = 0):
        self.sampler = sampler
        self.start = start

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        stream = itertools.islice(iter(self.sampler), self.start, None)
        return ((int(idx), pos) for pos, idx in enumerate(stream, start=self.start))


class PositionSeededDataset(Dataset):
    """``dataset[(index, position)]``: the mapped sample, augmented with RNGs seeded by position."""

    def __init__(self, dicts: List[dict], mapper: Callable, seed: int):
        self.dicts, self.mapper, self.seed = dicts, mapper, seed

    def __len__(self):
        return len(self.dicts)

    def __getitem__(self, key: Tuple[int, int]):
        index, position = key
        sample_seed = (self.seed * 1_000_003 + position) % (2**32)
        np.random.seed(sample_seed)
        random.seed(sample_seed)
        torch.manual_seed(sample_seed)
        record = self.dicts[index]
        try:
            return self.mapper(record)
        except (OSError, SyntaxError) as e:  # missing, not an image, truncated; PIL: SyntaxError for a broken PNG
            raise ImageReadError(f"{record.get('file_name')}: image {record.get('image_id')} cannot be read "
                                 f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); run "
                                 f"`python -m pipeline.data.prepare` to validate "
                                 f"the dataset again") from None


def build_sampler(cfg, dicts: List[dict], seed: int) -> Sampler:
    """detectron2's sampler of ``DATALOADER.SAMPLER_TRAIN``, with an explicit seed."""
    name = cfg.DATALOADER.SAMPLER_TRAIN
    if name == "TrainingSampler":
        return TrainingSampler(len(dicts), seed=seed)
    if name == "RepeatFactorTrainingSampler":
        factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            dicts, cfg.DATALOADER.REPEAT_THRESHOLD)
        return RepeatFactorTrainingSampler(factors, seed=seed)
    raise ValueError(f"DATALOADER.SAMPLER_TRAIN={name!r}; allowed: TrainingSampler, RepeatFactorTrainingSampler")


def _as_list(batch):
    return batch


def build_train_loader(cfg, seed: int, start_iter: int = 0) -> DataLoader:
    """Batches of ``SOLVER.IMS_PER_BATCH`` mapped samples, from iteration ``start_iter`` on."""
    dicts = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
    dataset = PositionSeededDataset(dicts, DatasetMapper(cfg, is_train=True), seed)
    batch = cfg.SOLVER.IMS_PER_BATCH
    sampler = PositionSampler(build_sampler(cfg, dicts, seed), start=start_iter * batch)
    return DataLoader(dataset, batch_sampler=BatchSampler(sampler, batch, drop_last=True),
                      num_workers=cfg.DATALOADER.NUM_WORKERS, collate_fn=_as_list)


class LazyLoader:
    """An iterable whose loader is built at the first ``next()``, so the start can still be set
    after the trainer (which calls ``iter()`` in its constructor) exists."""

    def __init__(self, build: Callable[[int], DataLoader]):
        self.build = build
        self.start_iter = 0

    def __iter__(self):
        yield from self.build(self.start_iter)
