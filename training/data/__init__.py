"""Data sets in one normalized schema, the temporal split, and per-sample histories."""

from training.data.registry import DATASETS, DatasetInfo, dataset_info, load_dataset
from training.data.samples import SampleTable, build_samples
from training.data.schema import RawDataset

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "RawDataset",
    "SampleTable",
    "build_samples",
    "dataset_info",
    "load_dataset",
]
