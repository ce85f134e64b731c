"""Small self-contained helpers shared by the trainer, the trackers and the command line."""
