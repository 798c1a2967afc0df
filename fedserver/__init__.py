"""The coordinator: a long-running asyncio gRPC server that runs federated rounds."""
