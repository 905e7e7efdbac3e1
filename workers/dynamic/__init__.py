"""Dynamic computation: models that spend less compute on easy inputs (the early_exit method)."""
