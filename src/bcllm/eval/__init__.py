"""Measuring a student against its original: metrics, teacher cache, floor, streamed evaluation, lm-eval side by side."""
