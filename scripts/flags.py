"""Settings as the command line gives them: ``monai.bundle run`` and fire pass ``--resume true`` on as the text
``'true'``, which Python takes for true whatever it says. The runtime's one reader of such flags, below every module
that takes one (the configs' helpers and the command-line tools alike)."""

__all__ = ["as_bool"]


def as_bool(value, name):
    """A flag's value as a bool. ``monai.bundle run`` and fire pass ``--resume true`` on as the text ``'true'``, and
    the text ``'false'`` is true to Python; so ``True``/``False``, ``1``/``0`` and the texts true/false, yes/no, 1/0
    (any case) are read as what they say, and anything else is refused.

    Args:
        value: the value given (from a config id or the command line).
        name: the flag's name, for the message.

    Returns:
        The bool.

    Raises:
        ValueError: ``--name must be true or false, got ...``.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = value.strip().lower() if isinstance(value, str) else None
    if text in ("true", "yes", "1"):
        return True
    if text in ("false", "no", "0"):
        return False
    raise ValueError(f"--{name} must be true or false, got {value!r}")
