"""The errors raymerge raises on purpose: each carries a one-line message meant for the user."""


class RaymergeError(Exception):
    """A failure the user can act on; the CLI prints its message on one line and exits 1."""


class InputError(RaymergeError):
    """Bad input: a parent, an option or the output directory. Raised before any work starts."""
