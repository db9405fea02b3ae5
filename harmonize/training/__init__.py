"""What every training shares: the run helper (`run.TrainingRun`: accelerator, seed,
progress, resumable loop, log, atomic state), the device and precision policy
(`device`), the epoch sampler and the checkpoint metadata. Each translator's and the
classifier's `train.py` keeps its own step visible and calls these."""
