"""Support code: what a serious tool needs but a reader of the idea does not.

The tutorial is the top-level chapters (README "Layout"); the modules here are imported by them and
never import a chapter that imports them: image sources, the training engine, the command line, resume,
checkpoints and outputs, plots.
"""
