"""slimline core: pure torch/numpy/stdlib models, checkpoints, data, training, PCA, PCN, metrics.

Nothing here knows about settings, databases, HTTP or logging configuration.
"""
