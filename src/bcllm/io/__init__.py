"""Files in and out: models, prompts, result files, saved students (checkpoint), exported students (artifact)."""
