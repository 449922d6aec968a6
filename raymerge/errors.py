"""The errors raymerge raises on purpose: each carries a one-line message meant for the user."""


class RaymergeError(Exception):
    """A failure the user can act on; the CLI prints its message on one line and exits 1."""


class InputError(RaymergeError):
    """Bad input: a parent, an option, a recipe, the output directory or the cluster's resources.

    Most are raised before any work starts; what only the data shows (a NaN, differing non-float
    tensors) or only the actors see (an output they cannot write) is raised once it is found,
    before any output file exists.
    """
