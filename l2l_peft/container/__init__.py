"""Container mode, the CLI's run inside the evaluation image: its sandbox settings (environment) and
the chain of ever simpler predictors that always answers once the task was read (fallback)."""
