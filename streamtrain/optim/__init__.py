"""Pure tensor math for the update rules: Adam, projectors, LR schedules, rounding, state storage."""
