"""Training checkpoints (resume) and Hugging Face exports."""
