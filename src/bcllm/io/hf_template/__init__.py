"""Files copied into an exported Hugging Face folder (bcllm.artifact.export_student); not imported by bcllm."""
