"""S3 storage: one multipart upload per upload, state and unfilled bytes kept in S3 too.

Keys under ``s3://bucket/prefix/``:

``<id>``             the finished object (the multipart upload's key)
``<id>.info``        the record plus S3 state: multipart upload id, part size, parts, tail
``<id>.tail-<n>``    bytes that do not fill a part yet (S3 parts but the last need 5 MiB)
``<id>.lock``        a lease, taken with a conditional write, so one instance writes at a time
``<id>.chunks/<n>.<size>.<sha256>.<etag>``
                     chunk n of a chunk session is stored (as part n); one listing finds all
``<id>.chunk-<n>.lock``
                     the lease on one chunk, so only one instance uploads part n at a time
``_preempt/<id>``, ``_preempt/<id>.chunk-<n>``
                     left by an instance that wants the lease; its holder lets go (one
                     listing a process finds the markers for all the leases it holds)
``_heartbeats/<instance>``
                     a process's heartbeat: keeps the upload leases it holds past their
                     own 6 s (`lease.Heartbeat`), one renewal for all of them
``_outbox/<event>.json``
                     a hook event not delivered yet (no upload id starts with ``_``)

With a coordinator (Redis) its leases stand in for the lease objects, and every write of
the info object checks the lease's fencing token (`state.save`).

The info object is the commit point: parts and tail are uploaded first, then the info
object names them, so the offset a client is told is always bytes S3 has confirmed. A
tail is written under a new key each time and the old one deleted after the commit, so a
crash at any point leaves the previous state whole. Any instance can serve any upload.
Mid-request a streaming writer marks the info object open instead of naming each part,
and readers take the confirmed parts that follow from ListParts (`state.State.adopt`).

The rooms: `client` (boto3, the pools, keys, listing pages), `state` (the info object and
its `Part`s), `multipart` (parts, completion, joins), `spool` (a part's scratch file),
`writer` (appends through spooled parts), `lease` (the shared lock and its markers),
`chunks` (chunk sessions), `housekeeping` (describe, orphans), `outbox` (hook events),
`store` (`S3Storage`, which hands each job to its room).
"""

from .client import MAX_PART, MAX_PARTS, MIN_PART, part_size_for
from .store import S3Storage

__all__ = ["MAX_PART", "MAX_PARTS", "MIN_PART", "S3Storage", "part_size_for"]
