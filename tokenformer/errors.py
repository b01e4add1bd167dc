"""The one exception type for mistakes a user can make (bad config, wrong checkpoint, bad input).

The command line prints its message as a single line; library users can catch it.
"""


class TokenFormerError(ValueError):
    """A user-facing error whose message is one sentence naming the problem and the fix."""
