"""Generated protobuf and gRPC code for proto/ (do not edit; run scripts/gen_protos.py)."""
