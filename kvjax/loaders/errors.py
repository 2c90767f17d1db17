"""Errors raised for unusable model files."""


class ModelFileError(ValueError):
    """A model file is missing, corrupt, unsupported or inconsistent with its config."""
