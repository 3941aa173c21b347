"""A short-budget nnU-Net trainer for the benchmarks in bench/, found through ``nnUNet_extTrainer``
pointing at this folder.

Epochs, iterations and validation iterations come from BENCH_EPOCHS / BENCH_ITERS / BENCH_VAL_ITERS;
the end-of-training validation of the training cases is skipped (BENCH_VALIDATE=1 keeps it), so
wall-clock budgets compare training with training. Everything else is nnU-Net's default trainer.
"""
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

    def perform_actual_validation(self, save_probabilities: bool = False):
        if os.environ.get("BENCH_VALIDATE") == "1":
            return super().perform_actual_validation(save_probabilities)
        self.print_to_log_file("bench: end-of-training validation skipped")
