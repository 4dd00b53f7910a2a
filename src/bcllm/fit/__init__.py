"""Fitting a student: calibration text, input statistics and closed-form fits, channel transforms, block reconstruction, distillation, and build_student (fit/student.py)."""
