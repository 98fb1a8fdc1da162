"""The one exception type the workbench raises for bad input.

The CLI turns a :class:`WorkbenchError` into a one-line message and a non-zero exit code, never a
traceback: every check of user input (paths, checkpoints, prompts, devices, sizes) raises it with a
message that says what was wrong and, where it helps, what to do instead.
"""


class WorkbenchError(Exception):
    """Bad input or an unsupported request, explained in one line for the user."""
