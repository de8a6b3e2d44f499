"""Shared test set-up: one torch thread (tiny models run far slower with two threads on a loaded 2-core machine)."""
import torch

torch.set_num_threads(1)
