"""Model specs, one per family (src/specs/base.py): the model recipe apart from the training loop."""
