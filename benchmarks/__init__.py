"""Side-by-side benchmarks of soafarm (run on the local RabbitMQ and Redis)."""
