"""Shared pytest set-up: make the flat top-level modules importable and keep torch to the CPU threads we have."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
