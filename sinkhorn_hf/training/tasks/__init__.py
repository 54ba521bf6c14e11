"""One module per fine-tuning task: its data arguments, data loading, collator and metrics, as a
:class:`~sinkhorn_hf.training.run.Task` that :func:`~sinkhorn_hf.training.run.run_task` runs."""
