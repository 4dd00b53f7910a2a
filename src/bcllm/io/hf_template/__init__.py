"""Files copied into an exported Hugging Face folder (bcllm.io.artifact.export_student); not imported by bcllm."""
