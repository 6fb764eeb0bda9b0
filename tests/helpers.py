"""Helpers shared by the test modules (pytest puts tests/ on sys.path: `from helpers import ...`)."""


def initialize_and_run(workflow):
    """``initialize()`` then ``run()`` of a MONAI bundle workflow: one call, for a ``pytest.raises`` block."""
    workflow.initialize()
    workflow.run()


def raised_messages(excinfo):
    """The messages of a raised exception and of its causes, one per line: engines and config expressions wrap the
    error they meet in their own."""
    messages, err = [], excinfo.value
    while err is not None:
        messages.append(f"{type(err).__name__}: {err}")
        err = err.__cause__ or err.__context__
    return "\n".join(messages)
