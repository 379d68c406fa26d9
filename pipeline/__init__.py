"""Model assembly, the train/eval loop, checkpoints and the CLI entry points."""
