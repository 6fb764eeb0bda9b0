"""The refusal of a case, in a module of its own so that tools raise and catch it without importing MONAI."""

__all__ = ["InvalidCaseError"]


class InvalidCaseError(ValueError):
    """A case that cannot be used; the message names the case and the file."""
