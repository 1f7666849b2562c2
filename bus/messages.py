"""The or1 wire protocol: every message type, every constant, in one file.

A message travels as ``[header, *buffers]`` (see ``bus/codec.py``): the header is a msgpack map
``{"v": PROTOCOL_VERSION, "type": <TYPE>, "rid": <request id or 0>, ...fields}``; numpy arrays
anywhere in the fields travel as raw frames referenced from the header by index, dtype and shape.

Each message is a frozen-by-convention dataclass whose annotations *are* the schema: the codec
checks every field's presence and type against them on decode, so adding a field here is the
whole change. Nested records (``PromptItem``, ``Sample``, ``Group``, ...) are dataclasses too.
Optional fields have defaults, so a plain message stays small and old fields can be added
without breaking peers that don't send them.

Roles: the learner binds the control ROUTER and the weights ROUTER; actors, reward workers and
admin tools connect DEALERs. A relay (an actor with ``--relay-bind``) binds its own weights ROUTER.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar

import numpy as np

PROTOCOL_VERSION = 1

# --- reliability constants (zguide's Paranoid Pirate values) ---------------------------------
HEARTBEAT_S = 1.0  # interval between heartbeats, both ways
LIVENESS = 3  # a peer silent for LIVENESS * HEARTBEAT_S is dead
RECONNECT_MIN_S = 1.0  # client reconnect backoff starts here ...
RECONNECT_MAX_S = 32.0  # ... and doubles up to here

# --- limits ---------------------------------------------------------------------------------
MAX_MESSAGE_BYTES = 1 << 30  # zmq MAXMSGSIZE on every socket: a frame above this drops the peer's message
MAX_ARRAY_ELEMENTS = 1 << 28  # largest array a header may declare
MAX_FRAMES = 1 << 16  # most raw frames one message may carry
MAX_HEADER_BYTES = 16 << 20  # the msgpack header itself
MAX_ID_CHARS = 256  # ids, roles, codes, hosts, kinds: `Id` fields
MAX_ENDPOINT_CHARS = 512  # `Endpoint` fields
MAX_LINE_CHARS = 4096  # one line of text from a peer (reasons, errors, problems): `Line` fields
MAX_PATH_CHARS = 4096  # file paths and tensor names: `PathText` fields
MAX_STATS = 512  # entries of a Heartbeat's stats map
MAX_PROBLEM_CHARS = 512  # Heartbeat.problem as clients send it: one line of trouble, not a log
INLINE_ARRAY_BYTES = 1024  # arrays below this go inline in the header (a frame per tiny array costs more)
ALLOWED_DTYPES = ("uint8", "int8", "int32", "int64", "float16", "bfloat16", "float32", "float64", "bool")

# --- weight transfer ------------------------------------------------------------------------
CHUNK_BYTES = 4 << 20  # weight chunk size
PULL_WINDOW = 8  # outstanding GetChunk requests per puller (credit pipelining, zguide ch. 7)
MAX_QUEUED_REPLIES = 64  # replies a weights port queues for one peer (its SNDHWM) and requests it parks; > any window
CHUNK_TIMEOUT_S = 10.0  # a chunk not answered within this is re-requested from another source
VERSION_WAIT_S = 2.0  # a source asked for a version newer than it holds waits this long for it (< CHUNK_TIMEOUT_S)
RELAY_FANOUT = 2  # most children one weight source serves for one version

# --- roles, reasons, error codes ------------------------------------------------------------
ROLE_ACTOR = "actor"
ROLE_REWARD = "reward"
ROLE_ADMIN = "admin"
ROLES = (ROLE_ACTOR, ROLE_REWARD, ROLE_ADMIN)

REWARD_RANGE = (0.0, 1.0)  # every ScoreOut.reward lies here (Skywork-OR1's rules give 0 or 1); else refused

FINISH_STOP = "stop"  # eos or a stop string
FINISH_LENGTH = "length"  # hit max_tokens (truncated)

ERR_BAD_MESSAGE = "bad_message"
ERR_HELLO_FIRST = "hello_first"  # the server does not know this peer (e.g. it restarted): say Hello again
ERR_STALE_EPOCH = "stale_epoch"  # work from an earlier learner epoch
ERR_UNKNOWN_LEASE = "unknown_lease"
ERR_FORBIDDEN = "forbidden"
ERR_NOT_FOUND = "not_found"
ERR_BAD_VALUE = "bad_value"  # a Set whose value the setting refuses
ERR_INTERNAL = "internal"
ERR_ID_IN_USE = "id_in_use"  # another live session holds this worker_id: Hello again once it is gone
ERR_BAD_REPLY = "bad_reply"  # client side: the server answered with a message of the wrong type

# SubmitAck.rejected reasons: why the learner refused one group of a Submit (learner/scheduler.py)
REJECT_EXPIRED = "expired"  # the lease's deadline passed (its prompts were requeued)
REJECT_WRONG_ACTOR = "wrong_actor"  # the lease belongs to another actor
REJECT_NOT_IN_LEASE = "not_in_lease"  # the prompt is not one of the lease's
REJECT_DUPLICATE = "duplicate"  # the prompt was already submitted
REJECT_GROUP_SIZE = "bad_group_size"  # not the lease's n samples
REJECT_OLD_WEIGHTS = "old_weights"  # weight_version below the lease's min_version (learner/staleness.py)
REJECT_FUTURE_WEIGHTS = "future_weights"  # weight_version the learner never published
REJECT_BAD_SAMPLE = "bad_sample"  # ids/logprobs malformed, too long, not finite, outside the vocabulary, or bad versions

SOURCE_LEARNER = "learner"  # WeightSource.source_id of the learner itself (other ids are relay worker ids)

WAIT_ADMISSION = "admission"  # the staleness bound admits no more groups now
WAIT_WEIGHTS = "weights"  # pull newer weights first (min_version in the reply)
WAIT_NO_DATA = "no_data"  # the dataset / stage is exhausted for now
WAIT_DONE = "done"  # the run has finished: say Bye and exit


@dataclass(frozen=True)
class Limit:
    """A bound the codec enforces on a field (``Annotated[str, Limit(n)]``): at most `most`
    characters of a str, or entries of a list or map. Everything a peer names or says is bounded,
    so no id, endpoint or message can fill memory or logs (the codec refuses the whole message)."""

    most: int


Id = Annotated[str, Limit(MAX_ID_CHARS)]
Endpoint = Annotated[str, Limit(MAX_ENDPOINT_CHARS)]
Line = Annotated[str, Limit(MAX_LINE_CHARS)]
PathText = Annotated[str, Limit(MAX_PATH_CHARS)]
Stats = Annotated[dict[str, float], Limit(MAX_STATS)]


class Message:
    """Base of every wire message; ``TYPE`` is the header's ``type`` string."""

    TYPE: ClassVar[str] = ""


# --- nested records -------------------------------------------------------------------------


@dataclass
class SamplingSpec:
    """Sampling for one lease: `n` samples per prompt (the group size) at `temperature`/`top_p`."""

    n: int
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    seed: int | None = None


@dataclass
class PromptItem:
    """One prompt to generate a group for. `prompt_id` is the dataset id, `token_ids` int32."""

    prompt_id: Id
    token_ids: np.ndarray


@dataclass
class VersionSpan:
    """From token `start` of a sample on (until the next span), its tokens were sampled with weights
    `version`: an actor that loads weights in the middle of a generation (actor.update_mode =
    in_flight) records where each version took over."""

    version: int
    start: int


@dataclass
class Sample:
    """One sampled response: token ids (int32), the behaviour log-prob of each (float32, at the
    sampling temperature), why it ended (FINISH_STOP / FINISH_LENGTH), and its decoded text.
    `versions`: which weights sampled which tokens, in order — starts strictly increasing from 0,
    versions strictly increasing, none below the group's `weight_version`. Empty: every token came
    from the group's `weight_version`."""

    token_ids: np.ndarray
    logprobs: np.ndarray
    finish_reason: Id
    text: str
    versions: list[VersionSpan] = field(default_factory=list)


@dataclass
class Group:
    """The `n` samples of one prompt, generated with weights `weight_version`: the oldest weights any
    of its tokens came from (samples with in-flight updates say in `Sample.versions` where newer
    ones took over). Staleness is counted from it (learner/staleness.py)."""

    prompt_id: Id
    weight_version: int
    samples: list[Sample]


@dataclass
class ScoreItem:
    """One response to score: `kind` is "math" or "code"; `reference` the gold answer (math) or a
    test spec as JSON text (code)."""

    kind: Id
    response: str
    reference: str


@dataclass
class ScoreOut:
    """The score of one item. `error` is empty on success; a failed item has reward 0."""

    reward: float
    error: Line = ""
    detail: Line = ""


@dataclass
class TensorMeta:
    """Where one tensor sits in a flat weight buffer: `offset` and `nbytes` in bytes."""

    name: PathText
    dtype: Id
    shape: list[int]
    offset: int
    nbytes: int


@dataclass
class PeerInfo:
    """One row of the fleet table in StatusReply."""

    role: str
    worker_id: str
    host: str
    weight_version: int
    lag: int
    tokens_per_s: float
    last_seen_s: float
    leases: int = 0
    relay_endpoint: str = ""  # as other actors dial it (host filled in from the peer's address)
    address: str = ""  # the address its connection comes from
    problem: str = ""  # its last reported trouble (Heartbeat.problem)
    device: str = ""  # Hello.device


# --- session --------------------------------------------------------------------------------


@dataclass
class Hello(Message):
    """First message of every client (and again after a reconnect or learner restart)."""

    TYPE: ClassVar[str] = "hello"
    role: Id
    worker_id: Id
    host: Id = ""  # hostname, for people (status, logs); never used to decide anything
    host_id: Id = ""  # ``bus.weights.shm.host_id()``: same value = same host and /dev/shm (shared-memory weights)
    capacity: int = 1
    weight_version: int = -1
    relay_endpoint: Endpoint = ""
    admin_key: Line = ""
    session: Id = ""  # random per client process: a reconnect keeps it, another process claiming the id does not
    device: Id = ""  # where it computes: "cpu", "gpu 0,1" (the ids it was given), "cuda" (all): for `or1 status`


@dataclass
class Welcome(Message):
    """The learner's answer to Hello: who it is and how to behave."""

    TYPE: ClassVar[str] = "welcome"
    run_id: Id
    epoch: int
    version: int
    heartbeat_s: float
    liveness: int
    max_staleness: int
    model: PathText = ""
    weights_endpoint: Endpoint = ""
    sampling: SamplingSpec | None = None
    stage: int = 0
    max_model_len: int = 0  # prompt + response tokens the run needs (actor.max_model_len unless set)


@dataclass
class Heartbeat(Message):
    """Both ways. The client's carries its stats; the learner's reply carries its `version` and η."""

    TYPE: ClassVar[str] = "heartbeat"
    version: int = -1
    max_staleness: int = -1
    weight_version: int = -1
    stats: Stats = field(default_factory=dict)
    problem: Line = ""  # the client's current trouble in one line (e.g. weights it cannot pull), "" = none


@dataclass
class Bye(Message):
    TYPE: ClassVar[str] = "bye"
    reason: Line = ""


@dataclass
class Error(Message):
    TYPE: ClassVar[str] = "error"
    code: Id
    message: Line = ""


# --- actors ---------------------------------------------------------------------------------


@dataclass
class LeaseRequest(Message):
    TYPE: ClassVar[str] = "lease_request"
    max_groups: int
    weight_version: int


@dataclass
class Lease(Message):
    """A grant of `len(prompts)` groups, valid in `epoch`, due back within `deadline_s`.
    The actor must generate with weights of version ≥ `min_version`."""

    TYPE: ClassVar[str] = "lease"
    lease_id: int
    epoch: int
    prompts: list[PromptItem]
    sampling: SamplingSpec
    min_version: int
    deadline_s: float


@dataclass
class Wait(Message):
    """No lease now: `reason` is one of WAIT_*; retry after `retry_after_s`."""

    TYPE: ClassVar[str] = "wait"
    reason: Id
    retry_after_s: float = 0.5
    min_version: int = -1


@dataclass
class Submit(Message):
    TYPE: ClassVar[str] = "submit"
    lease_id: int
    epoch: int
    groups: list[Group]


@dataclass
class SubmitAck(Message):
    TYPE: ClassVar[str] = "submit_ack"
    lease_id: int
    accepted: int
    rejected: int = 0
    reason: Line = ""


@dataclass
class Release(Message):
    """Lease ids given back unfinished (shutdown): the learner requeues their prompts at once."""

    TYPE: ClassVar[str] = "release"
    lease_ids: list[int]


# --- reward workers -------------------------------------------------------------------------


@dataclass
class Ready(Message):
    """A reward worker can take `credits` more items."""

    TYPE: ClassVar[str] = "ready"
    credits: int


@dataclass
class ScoreRequest(Message):
    TYPE: ClassVar[str] = "score_request"
    request_id: int
    items: list[ScoreItem]


@dataclass
class ScoreResult(Message):
    """One ScoreOut per item of the request, in order."""

    TYPE: ClassVar[str] = "score_result"
    request_id: int
    results: list[ScoreOut]


# --- weights --------------------------------------------------------------------------------


@dataclass
class WeightSource(Message):
    """Request (actor → learner): where to pull `version` (-1 = latest). Reply: `endpoint` is a
    weights ROUTER (the learner's or a relay peer's, `source_id`) that holds or is receiving it."""

    TYPE: ClassVar[str] = "weight_source"
    version: int = -1
    endpoint: Endpoint = ""
    source_id: Id = ""


@dataclass
class GetManifest(Message):
    TYPE: ClassVar[str] = "get_manifest"
    version: int = -1


@dataclass
class Manifest(Message):
    """A weight version as one flat buffer: its tensors, size, chunking and checksums
    (crc32 per chunk; `checksum` is the crc32 of the whole buffer)."""

    TYPE: ClassVar[str] = "manifest"
    version: int
    tensors: list[TensorMeta]
    total_bytes: int
    chunk_bytes: int
    chunk_crcs: list[int]
    checksum: int


@dataclass
class GetChunk(Message):
    TYPE: ClassVar[str] = "get_chunk"
    version: int
    index: int


@dataclass
class Chunk(Message):
    """Chunk `index` of `version`: `data` is a uint8 array sent as one raw frame."""

    TYPE: ClassVar[str] = "chunk"
    version: int
    index: int
    data: np.ndarray


@dataclass
class GetShared(Message):
    """Request (puller → weights ROUTER on the same host): map `version` (-1 = latest) from shared
    memory instead of pulling its chunks. `host` is the puller's ``bus.weights.shm.host_id()``. Answered
    with Shared once the source holds the whole version (a relay still receiving answers when it
    has the last chunk), or at once with Error(not_found) when the host differs or the version is
    not in shared memory: the puller then pulls chunks as usual."""

    TYPE: ClassVar[str] = "get_shared"
    version: int
    host: Id


@dataclass
class Shared(Message):
    """Reply to GetShared: the version's flat buffer is the file `path` (``/dev/shm/or1-w-…``),
    laid out and checksummed as `manifest` says; every chunk's crc was checked by the source."""

    TYPE: ClassVar[str] = "shared"
    path: PathText
    manifest: Manifest
    file_id: Id = ""  # the file's device:inode at the source; the puller maps it only if its open file matches


# --- admin ----------------------------------------------------------------------------------


@dataclass
class Status(Message):
    TYPE: ClassVar[str] = "status"


@dataclass
class StatusReply(Message):
    TYPE: ClassVar[str] = "status_reply"
    run_id: str
    epoch: int
    version: int
    max_staleness: int
    fleet: list[PeerInfo]
    queues: dict[str, int]
    rates: dict[str, float]
    stage: int = 0


@dataclass
class Set(Message):
    """Change a live setting (`key` e.g. "max_staleness"); needs the admin key when one is set."""

    TYPE: ClassVar[str] = "set"
    key: Id
    value: Any
    admin_key: Line = ""


@dataclass
class SetReply(Message):
    TYPE: ClassVar[str] = "set_reply"
    key: str
    old: Any
    new: Any


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Hello, Welcome, Heartbeat, Bye, Error,
        LeaseRequest, Lease, Wait, Submit, SubmitAck, Release,
        Ready, ScoreRequest, ScoreResult,
        WeightSource, GetManifest, Manifest, GetChunk, Chunk, GetShared, Shared,
        Status, StatusReply, Set, SetReply,
    )
}


class ProtocolError(ValueError):
    """A message that does not follow this protocol: counted as `bus/bad_messages`, answered with
    Error where the sender is known, and dropped. Never fatal to a process."""
