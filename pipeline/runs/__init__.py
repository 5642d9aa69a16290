"""One run and its records: its settings (spec), training, evaluation, MLflow tracking, progress,
the pretrained backbone, and using a finished run (predict, export)."""
