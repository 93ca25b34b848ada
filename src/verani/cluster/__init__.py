"""Internal: a cluster of ``verani serve`` nodes on Redis, each room instance owned by one node.

See README, "Running more than one process". :mod:`.keys` names everything kept in Redis,
:mod:`.lease` is single activation with fencing, :mod:`.redis_store` is the store, and
:mod:`.node` routes sockets' frames to the owner of their room and back.
"""
