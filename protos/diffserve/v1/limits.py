"""Constants of the public gRPC API that both sides (scheduler and client) must agree on.

Hand-written (not generated); imports nothing, so the client and the scheduler share it without
importing each other.
"""

# Trailing-metadata key that carries the google.rpc.Status (with its details) of a failed call.
STATUS_DETAILS_KEY = "grpc-status-details-bin"

# Largest gRPC message either side sends or accepts: input images arrive inside SubmitJob.
MAX_MESSAGE_BYTES = 64 << 20

# Channel / server options that apply the limit above.
MESSAGE_SIZE_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)
