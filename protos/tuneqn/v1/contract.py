"""Identity of the ``tuneqn.v1`` contract (hand-written; the rest of this package is generated).

``CONTRACT_VERSION`` is the major contract: it equals the proto package and only
changes with a wire-incompatible ``tuneqn.v2``. ``CONTRACT_REVISION`` counts compatible
additions within ``tuneqn.v1`` (new fields or RPCs); bump it whenever agent.proto
grows, so that a client can tell whether an agent knows a feature it needs.
"""

CONTRACT_VERSION = "tuneqn.v1"
CONTRACT_REVISION = 5
#: Oldest agent revision a controller runs studies on: revision 3 brought the TVM fields
#: that job specs and results need; revision 4 only added the cache and failure fields of
#: ``AgentInfo`` that ``tuneqn agents`` shows (empty from an older agent); revision 5
#: ``Device.prediction_slots`` (0 from an older agent: one job at a time).
MIN_AGENT_REVISION = 3
#: Oldest client revision an agent serves: revision 2 moved the ORT fields of JobSpec into
#: ``backend_options`` and added attempts, so a revision-1 controller would be misread.
MIN_CLIENT_REVISION = 2
