"""guide-align: the CLI, config and pipeline that tie the stages together."""
__version__ = "0.1.0"
