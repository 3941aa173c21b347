"""Plan-driven training: one loop composed of a task, data, optimisation, DDP, checkpoints and loggers."""


def train_fold(*args, **kwargs):
    """See :func:`spineauto.training.trainer.train_fold` (imported lazily: torch is heavy)."""
    from spineauto.training.trainer import train_fold as _train_fold

    return _train_fold(*args, **kwargs)
