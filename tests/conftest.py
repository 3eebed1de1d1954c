"""Shared pytest set-up: make the flat top-level modules importable and run torch on one CPU thread.

The tests' models are tiny: a second intra-op thread saves little, and where the other core is busy
(another job, CI neighbours) the two threads wait on each other and every step gets many times slower."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)
