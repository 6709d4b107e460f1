"""The chaos suite: durable batches of 20,000 calls under faults, on private servers."""
