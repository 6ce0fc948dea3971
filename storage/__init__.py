"""Storage backends: where an upload's bytes and record live.

Each backend implements the contract in `uploadsrv.core.storage`; `uploadsrv.backend`
picks one from the settings.
"""
