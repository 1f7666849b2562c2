"""The weight transport: how a version of the policy's weights gets from the learner to every actor.

Separate from the control plane (``bus/``: messages, server, client), which only names versions and
endpoints; this package moves the bytes (docs/weights.md):

- ``store``: a version as one flat, 64-byte aligned buffer cut into CRC-checked chunks, with its
  manifest (``WeightStore``; ``PartialStore`` while it is being received).
- ``server``: a ROUTER that serves the newest versions chunk by chunk (the learner's weights port,
  an actor's relay).
- ``pull``: a DEALER that fetches a version with credit-pipelined chunk requests, retry and failover.
- ``crc``: CRC-32 of chunks and the whole buffer's crc combined from them.
- ``shm``: versions in ``/dev/shm`` mapped by pullers of the same host instead of pulled.
"""
