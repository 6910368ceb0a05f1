"""Data sets: loaders, the generic folder format, the synthetic generator, splits and downloads."""

from training.data.dataset import Dataset, DomainData, load_dataset
from training.data.splits import Split, make_split

__all__ = ["Dataset", "DomainData", "Split", "load_dataset", "make_split"]
