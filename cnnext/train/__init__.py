"""cnnext.train: the training loop of "Dive into Deep Learning" for cnnext's networks.

    from cnnext.train import fit
    result = fit("lenet", "digits", epochs=10, out="runs/lenet")   # python -m cnnext train lenet ...
    result.history          # [{'epoch': 1, 'train_loss': ..., 'train_acc': ..., 'test_acc': ..., 'seconds': ...}, ...]

Needs tqdm, matplotlib and scikit-learn (pip install 'cnnext[train]'); torchvision for
mnist, fashion-mnist, cifar10 and folder:PATH data. They are imported when used.
"""
from .data import DATASETS, DataError, load_data
from .loop import (CHECKPOINT_FORMAT, CheckpointError, FitResult, OptionError, TrainOptions, accepted_sizes,
                   amp_supported, fit, load_checkpoint)

__all__ = ["fit", "FitResult", "TrainOptions", "DATASETS", "load_data", "load_checkpoint", "accepted_sizes",
           "amp_supported", "CHECKPOINT_FORMAT", "OptionError", "CheckpointError", "DataError"]
