"""The HTTP resources, and `assembly.create_app`, which puts middleware and routes together."""
