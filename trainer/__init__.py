"""Stage two: store + images -> student + D-PaDe -> checkpoints."""
