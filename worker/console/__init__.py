"""`outbox-worker console`: the operator's web console (the `console` extra).

Nothing is imported here, so that the command line loads without Starlette:
worker.console.command adds the command, worker.console.app builds the pages.
"""
