"""Code shared by the domain services: database access and the event backbone."""
