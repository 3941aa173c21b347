"""A short nnU-Net trainer for bench/bench_predict.py, found through ``nnUNet_extTrainer`` pointing at
this folder. Epochs and iterations come from BENCH_EPOCHS / BENCH_ITERS / BENCH_VAL_ITERS."""
import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainerBench(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ.get("BENCH_EPOCHS", "5"))
        self.num_iterations_per_epoch = int(os.environ.get("BENCH_ITERS", "50"))
        self.num_val_iterations_per_epoch = int(os.environ.get("BENCH_VAL_ITERS", "5"))
