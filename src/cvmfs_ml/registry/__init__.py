"""The registry service: publish by content ID (user-pub API), tokens, queue, metrics.

Modules: :mod:`.cid` (content IDs), :mod:`.config` (the config file and bearer tokens),
:mod:`.jobs` (the SQLite queue), :mod:`.worker` (one publishing thread per repository),
:mod:`.service` (what the HTTP layer calls), :mod:`.metrics`, :mod:`.app` (FastAPI).
"""
