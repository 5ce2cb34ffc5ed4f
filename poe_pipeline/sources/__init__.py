"""Price sources: the poe.watch live API, poe.ninja dumps and API, and the offline replay server."""
