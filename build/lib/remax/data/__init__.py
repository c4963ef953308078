"""Data: loaders, chat templates, judge answer formats and the synthetic task."""
