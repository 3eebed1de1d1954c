"""Support code: what a serious tool needs but a reader of the idea does not.

The tutorial is the top-level files (README "Layout"); the modules here serve them: image sources
(`sources`, `download`), the recipes and the training engine (`recipes`, `engine`), a run's state and log
(`run`), the command line (`cli`), resume, checkpoints and outputs (`resume`, `store`, `outputs`), pictures
(`plots`, `sheet`) and query mode (`query`). They import the parts of the idea they serve (data.py,
vitdsi.py, metrics.py), never a step that uses them (train.py, de.py, grow.py, benchmark.py).
"""
