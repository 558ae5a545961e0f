"""User-facing errors.

Anything the user can fix (a bad argument, a missing file, a model the passes cannot
rewrite) is raised as a GraphoptError: the CLI prints its message as one paragraph and
exits with status 2, without a traceback. Anything else is a bug and keeps its traceback.
"""


class GraphoptError(Exception):
    """An error the user can act on. The message says what was wrong and what to do."""


class PassMatchError(GraphoptError):
    """A pass could not find what it rewrites in a network. `hint`: what to check, from the pass."""

    def __init__(self, pass_name: str, network: str, missing: str, hint: str = ""):
        self.pass_name, self.network, self.missing, self.hint = pass_name, network, missing, hint
        super().__init__(f"pass '{pass_name}' cannot rewrite network '{network}': {missing}. graphopt did not write "
                         f"a possibly wrong ONNX for it.{' ' + hint if hint else ''}")

    def __reduce__(self):  # raised in an export worker process, re-raised in the parent
        return type(self), (self.pass_name, self.network, self.missing, self.hint)
